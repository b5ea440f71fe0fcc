"""The bundled demo datasets: reproducible from the generator, well-formed, split cleanly, bilingual."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minimind.demo_data import DEMO_DIR, demo_file
from minimind.demo_data.generate import FILES, generate
from minimind.demo_data.records import FULL_REPLY_KINDS

CJK = re.compile(r"[\u4e00-\u9fff]")
ROLES = {"system", "user", "assistant"}
CONVERSATION_FILES = ("sft.jsonl", "sft_eval.jsonl", "rlaif.jsonl", "rlaif_eval.jsonl", "reasoning.jsonl")


def _load(name: str) -> list[dict]:
    with demo_file(name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_messages(messages: list) -> None:
    """Valid roles, non-empty string contents, optional leading system, user/assistant alternation."""
    assert isinstance(messages, list) and messages
    body = messages[1:] if messages[0]["role"] == "system" else messages
    assert body, "a conversation needs more than a system message"
    for i, m in enumerate(messages):
        assert set(m) == {"role", "content"}, m
        assert m["role"] in ROLES
        assert isinstance(m["content"], str) and m["content"].strip(), m
        assert m["role"] != "system" or i == 0, "system only comes first"
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) and len(body) % 2 == 0


def _user_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    counts = generate(out, seed=0)
    assert set(counts) == set(FILES)
    return out


@pytest.mark.parametrize("name", [*FILES, "PROVENANCE.md"])
def test_regeneration_is_byte_identical(regenerated: Path, name: str) -> None:
    assert (regenerated / name).read_bytes() == (DEMO_DIR / name).read_bytes(), (
        f"{name} is stale: regenerate it"
    )


def test_generation_is_deterministic_and_scalable(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", seed=3, scale=0.02)
    b = generate(tmp_path / "b", seed=3, scale=0.02)
    assert a == b
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert a[name] >= 4, f"{name} too small at a tiny scale"
    generate(tmp_path / "c", seed=4, scale=0.02)
    assert (tmp_path / "c" / "sft.jsonl").read_bytes() != (tmp_path / "a" / "sft.jsonl").read_bytes()


def test_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "minimind.demo_data.generate", "--out", str(tmp_path), "--scale", "0.01"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "sft.jsonl" in done.stdout
    assert (tmp_path / "choice.jsonl").is_file() and (tmp_path / "PROVENANCE.md").is_file()


def test_demo_file_api() -> None:
    assert demo_file("sft.jsonl") == DEMO_DIR / "sft.jsonl"
    with pytest.raises(FileNotFoundError):
        demo_file("nope.jsonl")


def test_bundle_size_and_provenance() -> None:
    assert sum((DEMO_DIR / n).stat().st_size for n in FILES) < 8 * 1024 * 1024
    text = (DEMO_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in text and "generate.py" in text
    for name in FILES:
        lines = sum(1 for _ in (DEMO_DIR / name).open(encoding="utf-8"))
        assert f"| `{name}` | {lines} |" in text


@pytest.mark.parametrize("name", FILES)
def test_every_line_parses_and_both_languages_present(name: str) -> None:
    raw = demo_file(name).read_text(encoding="utf-8")
    assert raw.endswith("\n") and "\r" not in raw
    lines = raw.splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict)
    assert any(CJK.search(line) for line in lines), f"{name} has no Chinese"
    assert any(line.isascii() for line in lines), f"{name} has no pure-ASCII (English) line"


@pytest.mark.parametrize("name", ["pretrain.jsonl", "pretrain_eval.jsonl"])
def test_pretrain_shape(name: str) -> None:
    rows = _load(name)
    assert all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"].strip() for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)


def test_pretrain_sizes() -> None:
    size = demo_file("pretrain.jsonl").stat().st_size
    assert 2_000_000 <= size <= 4_000_000
    assert 0.01 <= demo_file("pretrain_eval.jsonl").stat().st_size / size <= 0.04
    train = {r["text"] for r in _load("pretrain.jsonl")}
    assert not train & {r["text"] for r in _load("pretrain_eval.jsonl")}


@pytest.mark.parametrize("name", CONVERSATION_FILES)
def test_conversation_shape(name: str) -> None:
    for r in _load(name):
        _check_messages(r["conversations"])
        assert r["conversations"][-1]["role"] == "assistant"


def test_sft_mix() -> None:
    rows = _load("sft.jsonl")
    assert 8_000 <= len(rows) <= 15_000
    multi = sum(sum(m["role"] == "user" for m in r["conversations"]) >= 2 for r in rows) / len(rows)
    system = sum(r["conversations"][0]["role"] == "system" for r in rows) / len(rows)
    assert 0.10 <= multi <= 0.20 and 0.15 <= system <= 0.25
    replies = [m["content"] for r in rows for m in r["conversations"] if m["role"] == "assistant"]
    assert any("MiniMind" in c and CJK.search(c) for c in replies)
    assert any(c.startswith("I am MiniMind") for c in replies)


def test_sft_eval_answers() -> None:
    rows = _load("sft_eval.jsonl")
    assert 250 <= len(rows) <= 350
    for r in rows:
        assert isinstance(r["answer"], str) and r["answer"]
        assert r["answer"] in r["conversations"][-1]["content"]
    kinds = {r["kind"] for r in rows}
    assert {"arithmetic", "capital", "identity"} <= kinds


def test_rlaif_reference_is_short() -> None:
    for name in ("rlaif.jsonl", "rlaif_eval.jsonl"):
        for r in _load(name):
            assert len(r["conversations"][-1]["content"]) <= 20


def test_reasoning_format() -> None:
    pattern = re.compile(r"<think>.+</think><answer>.+</answer>", re.S)
    for r in _load("reasoning.jsonl"):
        assert pattern.fullmatch(r["conversations"][-1]["content"])


@pytest.mark.parametrize("name", ["dpo.jsonl", "dpo_eval.jsonl"])
def test_dpo_shape(name: str) -> None:
    for r in _load(name):
        assert set(r) == {"chosen", "rejected"}
        _check_messages(r["chosen"])
        _check_messages(r["rejected"])
        assert r["chosen"][:-1] == r["rejected"][:-1], "chosen and rejected share the prompt"
        assert r["chosen"][-1]["role"] == r["rejected"][-1]["role"] == "assistant"
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"]


def test_choice_shape() -> None:
    rows = _load("choice.jsonl")
    assert 150 <= len(rows) <= 250
    for r in rows:
        assert set(r) == {"question", "A", "B", "C", "D", "answer"}
        assert r["answer"] in {"A", "B", "C", "D"}
        options = [r[k] for k in "ABCD"]
        assert all(isinstance(o, str) and o for o in options) and len(set(options)) == 4
    counts = [sum(r["answer"] == k for r in rows) for k in "ABCD"]
    assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize(
    ("train", "held", "field"),
    [
        ("sft.jsonl", "sft_eval.jsonl", "conversations"),
        ("dpo.jsonl", "dpo_eval.jsonl", "chosen"),
        ("rlaif.jsonl", "rlaif_eval.jsonl", "conversations"),
    ],
)
def test_train_eval_disjoint(train: str, held: str, field: str) -> None:
    # Stricter than comparing whole prompts: no user message of an eval prompt occurs in training.
    train_users = {m["content"] for r in _load(train) for m in r[field] if m["role"] == "user"}
    eval_prompts = [r[field][:-1] for r in _load(held)]
    assert len({_user_text(p) for p in eval_prompts}) == len(eval_prompts), "eval prompts repeat"
    leaked = [
        m["content"] for p in eval_prompts for m in p if m["role"] == "user" and m["content"] in train_users
    ]
    assert not leaked, leaked[:5]


def test_held_out_arithmetic_never_in_training() -> None:
    # Operand pairs asked in eval files never show up as "a op b" in any training file.
    pair = re.compile(r"(\d+) ?(?:[-+*×]|plus|minus|times|加|减|乘以) ?(\d+)")
    held = set()
    for name in ("sft_eval.jsonl", "rlaif_eval.jsonl"):
        for r in _load(name):
            m = pair.search(_user_text(r["conversations"]))
            if m:
                held.add(frozenset((int(m.group(1)), int(m.group(2)))))
    assert len(held) > 50
    for name in ("sft.jsonl", "rlaif.jsonl", "dpo.jsonl", "pretrain.jsonl"):
        text = demo_file(name).read_text(encoding="utf-8")
        found = {frozenset((int(a), int(b))) for a, b in pair.findall(text)}
        assert not held & found, (name, sorted(map(sorted, held & found))[:5])


def test_pretraining_asks_no_held_out_question() -> None:
    # The quiz and dialogue paragraphs put questions and answers into pretraining, about training-side entities
    # only: a held-out question reaches the model only as its fact in prose, never in question form.
    text = "\n".join(r["text"] for r in _load("pretrain.jsonl"))
    questions = {_user_text(r["conversations"][:-1]) for r in _load("sft_eval.jsonl")}
    asked = [q for q in questions if any(f"{lead}{q}" in text for lead in ("Question: ", "问：", '"', "“"))]
    assert not asked, asked[:5]
    quiz = re.findall(r"^(?:Question: |问：)(.+)$", text, flags=re.M)
    assert len(quiz) > 3_000  # question/answer lines are a real part of pretraining, not a stray few


def test_fact_replies_are_the_short_answer() -> None:
    # Fact replies restate nothing from the question (no entity name for fine-tuning to push down); identity,
    # small talk and arithmetic keep their sentences.
    rows = _load("sft_eval.jsonl")
    facts = [r for r in rows if r["kind"] not in FULL_REPLY_KINDS]
    assert len(facts) > 150
    for r in facts:
        assert r["conversations"][-1]["content"] in (r["answer"] + ".", r["answer"] + "。", r["answer"]), r
    assert any(len(r["conversations"][-1]["content"]) > len(r["answer"]) + 5 for r in rows if r["kind"] == "identity")
