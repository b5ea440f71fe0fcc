"""`minimind eval` end to end: tables, --output JSON, --max-samples, one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minimind.cli import main
from minimind.eval import evaluate_choice, evaluate_ppl
from minimind.eval.cli import format_table
from minimind.modeldir import load_model_dir


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


CHOICE = [{"question": f"Which number is {i}?", "A": str(i), "B": str(i + 1), "C": str(i + 2), "D": str(i + 3),
           "answer": "A"} for i in range(6)]


def test_eval_choice_subprocess_writes_json_and_honours_max_samples(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "choice.jsonl", CHOICE)
    out = tmp_path / "res" / "choice.json"
    result = subprocess.run(
        [sys.executable, "-m", "minimind", "eval", "--model", str(model_dir), "--task", "choice", "--data", data,
         "--output", str(out), "--max-samples", "4", "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    model, tokenizer = load_model_dir(model_dir)
    expected = evaluate_choice(model, tokenizer, CHOICE[:4])  # the first 4 items, scored in this process
    assert saved["task"] == "choice" and saved["n"] == 4 and saved["accuracy"] == expected["accuracy"]
    assert saved["predictions"] == expected["predictions"]
    assert "accuracy" in result.stdout and "predictions" not in result.stdout


def test_eval_ppl_and_exact(model_dir, tmp_path, capsys):
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "北京是中国的首都。"}, {"text": "MiniMind is small."}])
    assert main(["eval", "--model", str(model_dir), "--task", "ppl", "--data", texts,
                 "--output", str(tmp_path / "p.json")]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    model, tokenizer = load_model_dir(model_dir)
    expected = evaluate_ppl(model, tokenizer, ["北京是中国的首都。", "MiniMind is small."])
    assert saved["n"] == 2 and saved["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
    assert saved["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    sft = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"role": "user", "content": f"{i}+1?"},
                                                                {"role": "assistant", "content": str(i + 1)}],
                                              "answer": str(i + 1)} for i in range(12)])
    assert main(["eval", "--model", str(model_dir), "--task", "exact", "--data", sft, "--max-new-tokens", "4",
                 "--output", str(tmp_path / "e.json")]) == 0
    assert "accuracy" in capsys.readouterr().out
    saved = json.loads((tmp_path / "e.json").read_text())  # every item's reply, for error analysis
    assert saved["n"] == 12 and [s["expected"] for s in saved["samples"]] == [str(i + 1) for i in range(12)]
    assert saved["correct"] == sum(s["correct"] for s in saved["samples"])


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"question": "q", "A": "x", "B": "y", "answer": "E"}'], ':1: field "answer"'),
        (['{"question": "q", "A": "x", "B": "y", "answer": "A"}', "{not json"], ":2: not valid JSON"),
        (['{"question": "q", "A": "x", "answer": "A"}'], ":1: expected at least two options"),
    ],
)
def test_eval_bad_data_is_a_one_line_error(model_dir, tmp_path, capsys, rows, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert main(["eval", "--model", str(model_dir), "--task", "choice", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_eval_missing_files_are_one_line_errors(model_dir, tmp_path, capsys):
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert main(["eval", "--model", str(model_dir), "--task", "ppl", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "none"), "--task", "ppl", "--data", texts]) == 2
    err = capsys.readouterr().err
    assert "no such model directory" in err and err.count("\n") == 1
    assert main(["eval", "--model", str(model_dir), "--task", "ppl", "--data", texts, "--max-samples", "0"]) == 2
    assert "--max-samples" in capsys.readouterr().err


def test_format_table_shows_scalars_only():
    table = format_table({"task": "choice", "n": 3, "accuracy": 0.5, "predictions": ["A"]})
    assert "0.5000" in table and "predictions" not in table and table.splitlines()[0].startswith("metric")


def test_eval_choice_reads_c_eval_and_cmmlu_csv_files(model_dir, tmp_path, capsys):
    """C-Eval's `id,question,A..D,answer,explanation` and CMMLU's `,Question,A..D,Answer` CSVs (quoted commas and
    newlines inside fields, a BOM) give the predictions the same rows give as JSONL."""
    import csv

    rows = [{**row, "question": f'{row["question"]}, "really"\nthink'} for row in CHOICE]
    ceval, cmmlu = tmp_path / "physics_val.csv", tmp_path / "anatomy.csv"
    with open(ceval, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        writer.writeheader()
        writer.writerows({**row, "id": i, "explanation": ""} for i, row in enumerate(rows))
    with open(cmmlu, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        writer.writerows([i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for i, r in enumerate(rows))
    predictions = []
    for data in (write_jsonl(tmp_path / "same.jsonl", rows), ceval, cmmlu):
        out = tmp_path / f"{data}.json"
        assert main(["eval", "--model", str(model_dir), "--task", "choice", "--data", str(data),
                     "--output", str(out)]) == 0
        saved = json.loads(out.read_text())
        assert saved["n"] == len(rows)
        predictions.append(saved["predictions"])
    assert predictions[0] == predictions[1] == predictions[2]
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text('id,question,A,B,C,D,answer\n0,"two\nlines",a,b,c,d,A\n1,q,a,b,c,d,F\n')
    assert main(["eval", "--model", str(model_dir), "--task", "choice", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert 'bad.csv:4: field "answer" is \'F\'' in err and err.count("\n") == 1
