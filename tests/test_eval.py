"""Evaluation: choice accuracy far above chance after training on the answers, near chance when random;
perplexity and bits per byte by their formulas, sliding windows, exact-match normalisation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_model

from minimind.eval import evaluate_choice, evaluate_exact, evaluate_ppl
from minimind.eval.choice import CONTEXT, CONTINUATION
from minimind.eval.exact import normalize, words
from minimind.eval.ppl import text_windows
from minimind.infer import Engine
from minimind.records import BadRecord
from minimind.train.rewards import contains_word

NAMES = ["Zorb", "Quill", "Mabo", "Tiven", "Rusk", "Pelo", "Vana", "Dorn", "Kife", "Luma", "Nesh", "Orix", "Bram",
         "Cyla", "Fenn", "Gusk", "Hale", "Ixo", "Jarl", "Wex", "Yorn", "Sift", "Tams", "Ulo", "Pim", "Rho"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]


def choice_set(seed: int = 0) -> tuple[list[dict], list[str]]:
    """104 C-Eval-style items (26 made-up facts x 4 option draws) and the training text stating each fact."""
    rng = random.Random(seed)
    facts = {name: rng.choice(COLOURS) for name in NAMES}
    items, texts = [], []
    for name, colour in facts.items():
        question = f"What colour does {name} like?"
        texts.append(CONTEXT.format(question=question) + CONTINUATION.format(option=colour))
        for _ in range(4):
            options = [colour, *rng.sample([c for c in COLOURS if c != colour], 3)]
            rng.shuffle(options)
            items.append({"question": question, **dict(zip("ABCD", options)), "answer": "ABCD"[options.index(colour)]})
    return items, texts


def train_on(texts: list[str], tokenizer, steps: int = 150) -> torch.nn.Module:
    """A plain full-batch loop: bos + text + eos, next-token loss on every token."""
    rows = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id]
            for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row)
    model = tiny_model(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ops this small gain nothing from a second thread, and on a busy machine OpenMP's spinning threads
    make them many times slower (training here: 15 s on one thread, minutes on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tokenizer):
    items, texts = choice_set()
    return train_on(texts, tokenizer), items, texts


def test_choice_far_above_chance_after_training_near_chance_when_random(trained, tokenizer):
    model, items, _ = trained
    assert len(items) >= 100
    result = evaluate_choice(model, tokenizer, items)
    assert result["n"] == len(items) and result["chance"] == pytest.approx(0.25)
    assert result["accuracy"] >= 0.8
    for seed in (1, 2):
        random_result = evaluate_choice(tiny_model(seed), tokenizer, items)
        assert 0.1 <= random_result["accuracy"] <= 0.42, random_result["accuracy"]
    assert evaluate_choice(model, tokenizer, items, score="sum")["accuracy"] >= 0.8


def test_choice_validates_items(tokenizer):
    model = tiny_model()
    with pytest.raises(BadRecord, match="item 1: field \"answer\""):
        evaluate_choice(model, tokenizer, [{"question": "q", "A": "x", "B": "y", "answer": "A"},
                                           {"question": "q", "A": "x", "B": "y", "answer": "C"}])
    two = evaluate_choice(model, tokenizer, [{"question": "q", "A": "x", "B": "y", "answer": "B"}])
    assert two["chance"] == 0.5 and two["predictions"][0] in ("A", "B")
    with pytest.raises(BadRecord, match=r'item 0: field "answer" is 3; expected one of A, B, C or an index 0-2'):
        evaluate_choice(model, tokenizer, [{"question": "q", "choices": ["x", "y", "z"], "answer": 3}])
    with pytest.raises(BadRecord, match=r'item 0: choices\[1\] must be a non-empty string'):
        evaluate_choice(model, tokenizer, [{"question": "q", "choices": ["x", " "], "answer": 0}])


def test_choice_reads_cmmlu_and_mmlu_shapes_as_the_c_eval_one(tokenizer):
    """The same question as C-Eval letters, CMMLU's capitalised keys, and MMLU's choices list with an index
    answer: the same scores, so the same prediction."""
    from minimind.eval.choice import validate_choice

    c_eval = {"question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
    cmmlu = {"Question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "B"}
    mmlu = {"question": "1+1=?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 1}
    expected = validate_choice(c_eval)
    assert validate_choice(cmmlu) == expected == validate_choice(mmlu) == validate_choice({**mmlu, "answer": "B"})
    five = validate_choice({"question": "q", "choices": list("vwxyz"), "answer": 4})
    assert five["answer"] == "E" and len(five["options"]) == 5
    model = tiny_model()
    results = [evaluate_choice(model, tokenizer, [item]) for item in (c_eval, cmmlu, mmlu)]
    assert results[0]["predictions"] == results[1]["predictions"] == results[2]["predictions"]


def test_ppl_lower_on_training_text_than_random_and_finite(trained, tokenizer):
    model, _, texts = trained
    learned = evaluate_ppl(model, tokenizer, texts)
    random_model = evaluate_ppl(tiny_model(1), tokenizer, texts)
    assert math.isfinite(learned["ppl"]) and math.isfinite(random_model["ppl"])
    assert learned["ppl"] < 2.0 < 100 < random_model["ppl"]
    assert learned["bits_per_byte"] < random_model["bits_per_byte"]


def test_ppl_and_bits_per_byte_formulas_against_the_model_loss(tokenizer):
    model = tiny_model(4)
    texts = ["北京是中国的首都。", "MiniMind is a small language model."]
    result = evaluate_ppl(model, tokenizer, texts)
    nll, tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()  # mean over the len-1 predicted tokens
        nll += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(nll, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_sum_logprobs_equals_the_logits_of_each_sequence_alone(quantize, monkeypatch):
    """Scored tokens only, sequences of several lengths batched with right padding; also through an int8 head
    (a module, not the fused path: scored 3 rows at a time here)."""
    from minimind.eval.scoring import sum_logprobs
    from minimind.infer.quantize import quantize_int8
    from minimind.kernels import head_loss

    model = tiny_model(5).eval()
    if quantize:
        quantize_int8(model)
        monkeypatch.setattr(head_loss, "CHUNK_BYTES", 3 * 4 * model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(3, 512, (n,), generator=g).tolist(), first) for n, first in
                 [(12, 5), (7, 1), (12, 11), (3, 2), (9, 4)]]
    got = sum_logprobs(model, sequences, max_batch_tokens=40)
    for (ids, first), (total, count) in zip(sequences, got):
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expected = sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))
        assert count == len(ids) - first
        # int8 matmuls round differently for another number of rows (~2e-4 relative here)
        assert total == pytest.approx(expected, rel=1e-3 if quantize else 1e-5, abs=1e-4)


def test_sliding_windows_score_every_token_once_with_half_a_window_of_context(tokenizer):
    ids = list(range(1, 42))
    for window in (2, 5, 8, 41, 64):
        pieces = text_windows(ids, window)
        scored = []
        for piece, first in pieces:
            assert len(piece) <= window and first >= 1
            offset = ids.index(piece[0])
            scored += list(range(offset + first, offset + len(piece)))
            if len(pieces) > 1 and offset > 0:
                assert first >= window - window // 2  # each scored token sees at least half a window
        assert scored == list(range(1, len(ids)))
    model = tiny_model(5)
    long_text = "北京是中国的首都。" * 12
    windowed = evaluate_ppl(model, tokenizer, [long_text], window=16)
    whole = evaluate_ppl(model, tokenizer, [long_text])
    assert windowed["tokens"] == whole["tokens"] and math.isfinite(windowed["ppl"])
    # the same windows scored one at a time by hand: each token's log-likelihood given its window's context
    ids = [tokenizer.bos_token_id, *tokenizer.encode(long_text, add_special_tokens=False)]
    nll = 0.0
    with torch.no_grad():
        for piece, first in text_windows(ids, 16):
            logprobs = torch.log_softmax(model(torch.tensor([piece])).logits[0].double(), -1)  # (T, vocab)
            nll -= sum(logprobs[t - 1, piece[t]].item() for t in range(first, len(piece)))
    assert windowed["nll"] == pytest.approx(nll, rel=1e-5) and windowed["nll"] != pytest.approx(whole["nll"])
    assert whole == evaluate_ppl(model, tokenizer, [long_text], window=1000)


def test_exact_normalisation_and_scoring():
    assert normalize(" Paris. ") == normalize("paris") == "paris"
    assert normalize("４２！") == "42"

    class FakeEngine:
        replies = ["The answer is 42.", "<think>maybe Paris</think>It is London", "北京。",
                   "The chemical symbol of potassium is K.", "It is 162.", "The symbol is Al."]

        def chat_prompt(self, messages):
            return [1, 2, 3]

        def generate(self, prompts, **kwargs):
            assert kwargs["temperature"] == 0.0
            return self.replies[: len(prompts)]

    def record(question, reference, answer=None):
        data = {"conversations": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": reference}]}
        return data if answer is None else {**data, "answer": answer}

    items = [record("6*7?", "It is 42", "42"), record("Capital?", "Paris", "Paris"), record("首都?", "北京"),
             record("Symbol of aluminium?", "Al", "Al"), record("100+62?", "62", "62"), record("Symbol?", "Al", "Al")]
    result = evaluate_exact(FakeEngine(), items)
    # thinking does not count; an answer glued inside a longer word or number ("chemical", "162") does not either
    assert [s["correct"] for s in result["samples"]] == [True, False, True, False, False, True]
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(3 / 6)
    with pytest.raises(BadRecord, match="item 0"):
        evaluate_exact(FakeEngine(), [record("q", "...")])


def test_exact_end_to_end_on_a_model_dir(model_dir):
    engine = Engine.from_pretrained(model_dir)
    items = [{"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}] * 3
    result = evaluate_exact(engine, items, max_new_tokens=4, batch_size=2)
    reply = engine.chat(items[0]["conversations"][:1], max_new_tokens=4)
    assert [s["reply"] for s in result["samples"]] == [reply] * 3  # batched greedy = alone
    right = contains_word(words(reply), words("你好！"))
    assert [s["correct"] for s in result["samples"]] == [right] * 3
    assert result["n"] == 3 and result["accuracy"] == float(right)
