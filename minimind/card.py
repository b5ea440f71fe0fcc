"""The model card (`README.md`) `minimind push` and `--push-to-hub` write into a model directory before upload.

Its YAML front matter is what the Hub indexes (and `huggingface_hub.ModelCard` parses): license, base_model (the
run's `--init` when that was a hub id), datasets (when hub ids), pipeline_tag, library_name and tags. The body
gives the run's final numbers (summary.json, written by every training run), the results of `minimind eval
--output FILE.json` files saved in the directory, the training settings, and how to load the model with
transformers, `minimind chat` and llama.cpp/Ollama.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The first line of the body of a card MiniMind wrote: a README.md with it is ours to rewrite on the next push,
# any other README.md is the user's and is kept unless --overwrite-card.
GENERATED_MARK = "<!-- written by minimind push: remove this line to keep your edits on the next push -->"
DEFAULT_LICENSE = "apache-2.0"
# train_config.json fields quoted in the card's "Training" table, in this order.
_TRAINING_FIELDS = ("stage", "max_steps", "epochs", "batch_size", "accumulation_steps", "lr", "warmup_steps",
                    "weight_decay", "max_seq_len", "dtype", "seed")
_NOT_EVAL = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "summary.json",
             "train_config.json", "adapter_config.json", "trackers.json", "special_tokens_map.json"}


@dataclass
class CardInfo:
    """What a card says beyond the directory's own files."""

    repo: str
    license: str = DEFAULT_LICENSE
    tags: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_hub_repo(value: Any) -> bool:
    return isinstance(value, str) and value.count("/") == 1 and not value.startswith((".", "/", "~"))


def _repo_of(value: str) -> str:
    """`org/name` of a hub id with an optional @revision (or, for data, `:config:split`)."""
    return value.split("@", 1)[0].split(":", 1)[0]


def front_matter(model_dir: Path, info: CardInfo) -> dict[str, Any]:
    """The card's metadata: the keys the Hub reads (license, base_model, datasets, pipeline_tag, library_name,
    tags)."""
    train = _read_json(model_dir / "train_config.json")
    sources = train.get("hub_sources") or {}
    meta: dict[str, Any] = {"license": info.license}
    base = sources.get("init") or _read_json(model_dir / "adapter_config.json").get("base_model_name_or_path")
    if _is_hub_repo(base):
        meta["base_model"] = _repo_of(base)
    datasets = [_repo_of(v) for k, v in sources.items() if k in ("data", "eval_data") and _is_hub_repo(v)]
    # Data given as Hub datasets (`--data hf:org/name[@rev]`) name themselves in train_config.json.
    datasets += [_repo_of(train[k][3:]) for k in ("data", "eval_data")
                 if isinstance(train.get(k), str) and train[k].startswith("hf:") and _is_hub_repo(train[k][3:])]
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    meta["pipeline_tag"] = "text-generation"
    meta["library_name"] = "transformers"
    tags = ["minimind", "custom_code"] if _remote_code(model_dir) else ["minimind"]
    if train.get("stage"):
        tags.append(str(train["stage"]))
    if (model_dir / "adapter_config.json").is_file():
        tags += ["lora", "peft"]
    meta["tags"] = list(dict.fromkeys(tags + list(info.tags)))
    return meta


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines + [""]


def _eval_results(model_dir: Path) -> list[tuple[str, Any]]:
    """(task/metric, value) of each `minimind eval --output` JSON file in the directory (they carry "task")."""
    rows = []
    for path in sorted(model_dir.glob("*.json")):
        if path.name in _NOT_EVAL:
            continue
        data = _read_json(path)
        if "task" not in data:
            continue
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"{data['task']} ({path.name}): {key}", value))
    return rows


def _remote_code(model_dir: Path) -> bool:
    """Whether transformers loads the directory through code shipped in it (config.json's auto_map): a MiniMind
    model directory does, its `--to llama` / `--to qwen3` exports and LoRA adapters do not."""
    return "auto_map" in _read_json(model_dir / "config.json")


def _model_line(model_dir: Path) -> str:
    config = _read_json(model_dir / "config.json")
    if not config:
        if not (model_dir / "adapter_config.json").is_file():
            return ""
        base = _read_json(model_dir / "adapter_config.json").get("base_model_name_or_path")
        if base and not _is_hub_repo(base):
            return (f"A MiniMind LoRA adapter (PEFT format). Its base model is a local directory ({base}): set "
                    "base_model_name_or_path in adapter_config.json to the base's Hub id so others can load it.")
        return "A MiniMind LoRA adapter (PEFT format)."
    parts = [f"{config.get(k)} {name}" for k, name in (("hidden_size", "hidden size"), ("num_hidden_layers",
             "layers"), ("vocab_size", "vocab")) if config.get(k) is not None]
    moe = " mixture-of-experts" if config.get("use_moe") or config.get("num_experts") else ""
    form = "" if _remote_code(model_dir) else f", as transformers' {(config.get('architectures') or ['?'])[0]}"
    return f"A MiniMind{moe} causal language model ({', '.join(parts)}{form})." if parts else ""


def card_text(model_dir: str | Path, info: CardInfo) -> str:
    """The whole README.md: YAML front matter, then the description, results, training settings and usage."""
    model_dir = Path(model_dir)
    meta = front_matter(model_dir, info)
    name = info.repo.split("/")[-1]
    summary = _read_json(model_dir / "summary.json")
    train = _read_json(model_dir / "train_config.json")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", GENERATED_MARK, "",
             f"# {name}", "", _model_line(model_dir) + " Trained with MiniMind (the `minimind` command of the "
             "`minimind-llm` package)" + (f" from [{meta['base_model']}](https://huggingface.co/{meta['base_model']})."
                                           if "base_model" in meta else "."), ""]
    if summary:
        lines += ["## Results of the training run", ""]
        lines += _table([(k, v) for k, v in summary.items() if isinstance(v, (int, float, str))], ("", "value"))
    evals = _eval_results(model_dir)
    if evals:
        lines += ["## Evaluation", ""] + _table(evals, ("task: metric", "value"))
    if train:
        lines += ["## Training", ""]
        rows = [(k, train[k]) for k in _TRAINING_FIELDS if train.get(k) is not None]
        if isinstance(train.get("command"), list):
            rows.append(("command", "`minimind " + " ".join(map(str, train["command"])) + "`"))
        lines += _table(rows, ("setting", "value"))
    lines += _usage(info.repo, _remote_code(model_dir), (model_dir / "adapter_config.json").is_file())
    return "\n".join(lines).rstrip() + "\n"


def _usage(repo: str, remote_code: bool, adapter: bool) -> list[str]:
    gguf = repo.split("/")[-1].lower() + ".gguf"
    if adapter:  # PEFT loads the base named in adapter_config.json, then the adapter
        how, loader = ("With PEFT (it loads the base model adapter_config.json names; a MiniMind base runs its own "
                       "code, hence `trust_remote_code=True`):"), \
            ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
             f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
             f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)']
    else:
        how = ("With transformers (the model's code ships in the repo, hence `trust_remote_code=True`):" if remote_code
               else "With transformers (a standard architecture: no remote code):")
        loader = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}"'
                  + (", trust_remote_code=True)" if remote_code else ")")]
    return [
        "## How to use", "",
        how, "",
        "```python",
        *loader,
        'messages = [{"role": "user", "content": "Hello, who are you?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
        "output = model.generate(inputs, max_new_tokens=128)",
        "print(tokenizer.decode(output[0][inputs.shape[1]:], skip_special_tokens=True))",
        "```", "",
        "With MiniMind (the `minimind-llm` package):", "",
        "```bash",
        f"minimind chat --model {repo}",
        f"minimind serve --model {repo}     # OpenAI-compatible API on port 8998",
        "```", "",
        "With llama.cpp or Ollama, after exporting to GGUF (a Modelfile is written beside the file):", "",
        "```bash",
        f"minimind convert {repo} --to gguf --out {gguf}",
        f"llama-cli -m {gguf} -cnv",
        "ollama create minimind -f Modelfile && ollama run minimind",
        "```", "",
    ]


def is_generated(readme: Path) -> bool:
    """True when `readme` is a card MiniMind wrote (so a new push may rewrite it)."""
    try:
        return GENERATED_MARK in readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_card(model_dir: str | Path, info: CardInfo, overwrite: bool = False) -> bool:
    """Write README.md into `model_dir` unless the user's own README.md is there (kept unless `overwrite`);
    -> whether it was written."""
    readme = Path(model_dir) / "README.md"
    if readme.exists() and not overwrite and not is_generated(readme):
        return False
    readme.write_text(card_text(model_dir, info), encoding="utf-8")
    return True
