"""lm-evaluation-harness runs on our model directory (remote code) and on its `--to llama` export, offline.

The task is defined here: a local JSONL of multiple-choice questions read through `dataset_path: json`, so
nothing is downloaded. Both runs must score every choice with the same log-likelihood.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lm_eval  # noqa: F401  (the dev extra: a missing harness fails here rather than skipping the parity claims)
import pytest
from convert_helpers import random_model_dir

from minimind.convert.llama import export_llama

QUESTIONS = [
    {"question": "12 plus 30 equals", "choices": ["42", "13", "7"], "answer": 0},
    {"question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0},
    {"question": "北京是中国的", "choices": ["首都", "河流", "山"], "answer": 0},
]


def write_task(folder):
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    (folder / "minimind_choice.yaml").write_text(
        textwrap.dedent(f"""\
        task: minimind_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    return folder


def run_lm_eval(model_args: str, tasks_dir, out_dir, cache_dir, model: str = "hf") -> tuple[dict, list[list[float]]]:
    """The documented command line, offline; returns (results, per-question choice log-likelihoods)."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache_dir),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        "minimind_choice",
        "--include_path",
        str(tasks_dir),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(out_dir),
        "--log_samples",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out_dir.rglob("samples_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    return results, [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.mark.slow
def test_lm_eval_scores_our_directory_the_llama_export_and_our_server_alike(tmp_path, tokenizer):
    """Three routes to the same log-likelihoods: HF remote code, the Llama export, and `minimind serve` through
    lm-eval's own OpenAI-completions client (`echo` + `logprobs`, the prompt's tokens scored by the server)."""
    from serve_helpers import free_port, running_server

    model_dir = random_model_dir(tmp_path / "model", tokenizer)
    export_llama(model_dir, tmp_path / "llama")
    tasks = write_task(tmp_path / "tasks")
    ours, our_scores = run_lm_eval(
        f"pretrained={model_dir},trust_remote_code=True", tasks, tmp_path / "out1", tmp_path / "hf"
    )
    llama, llama_scores = run_lm_eval(
        f"pretrained={tmp_path / 'llama'}", tasks, tmp_path / "out2", tmp_path / "hf"
    )
    acc = ours["results"]["minimind_choice"]["acc,none"]
    right = [max(range(len(row)), key=row.__getitem__) == q["answer"] for row, q in zip(our_scores, QUESTIONS)]
    assert acc == pytest.approx(sum(right) / len(QUESTIONS))  # acc is the argmax of the scores we compare
    assert llama["results"]["minimind_choice"]["acc,none"] == acc
    assert [len(s) for s in our_scores] == [3, 2, 3]
    for ours_row, llama_row in zip(our_scores, llama_scores):
        assert ours_row == pytest.approx(llama_row, abs=1e-4)
    assert all(score < 0 for row in our_scores for score in row)  # real log-likelihoods, not placeholders

    port = free_port()
    with running_server(["serve", "--model", str(model_dir), "--port", str(port), "--log-level", "warning"],
                        f"http://127.0.0.1:{port}/health"):
        served, served_scores = run_lm_eval(
            f"model=model,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={model_dir},"
            "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks, tmp_path / "out3", tmp_path / "hf", model="local-completions")
    assert served["results"]["minimind_choice"]["acc,none"] == acc
    assert [len(s) for s in served_scores] == [3, 2, 3]
    for ours_row, served_row in zip(our_scores, served_scores):
        assert served_row == pytest.approx(ours_row, abs=1e-3)
