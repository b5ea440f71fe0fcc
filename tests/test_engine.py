"""The Engine against HF `generate`, batched against alone, sampling, limits, and the step-level API."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from minimind.errors import UserError
from minimind.infer import Engine, SamplingParams
from minimind.infer.sampling import apply_penalties, sample_rows


def random_model(seed: int = 0, **overrides):
    """A tiny model with large random weights: peaked, prompt-dependent logits, so greedy paths differ."""
    model = tiny_model(seed, **overrides)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def prompts_of(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, n, **kwargs):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_equals_hf_generate(tokenizer, moe):
    model = random_model(use_moe=moe)
    engine = Engine(model, tokenizer)
    for prompt in prompts_of((5, 12) if not moe else (7,)):
        ours = engine.completions([prompt], max_new_tokens=20, ignore_eos=True)[0]
        assert ours.token_ids == hf_greedy(model, prompt, 20)
        assert ours.finish_reason == "length" and ours.completion_tokens == 20


def test_repetition_penalty_equals_hf(tokenizer):
    model = random_model(1)
    engine = Engine(model, tokenizer)
    prompt = prompts_of((9,), seed=1)[0]
    ours = engine.completions([prompt], max_new_tokens=16, ignore_eos=True, repetition_penalty=1.5)[0]
    assert ours.token_ids == hf_greedy(model, prompt, 16, repetition_penalty=1.5)


def test_batched_greedy_equals_each_alone_with_small_batches_and_prefill_budget(tokenizer):
    model = random_model(2)
    prompts = prompts_of((3, 17, 9, 1, 30, 6), seed=2)
    alone = [Engine(model, tokenizer).completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids
             for p in prompts]
    for engine in (Engine(model, tokenizer), Engine(model, tokenizer, max_batch_size=2, prefill_token_budget=40)):
        together = engine.completions(prompts, max_new_tokens=12, ignore_eos=True)
        assert [c.token_ids for c in together] == alone


def test_a_group_of_mixed_lengths_is_prefilled_in_chunks_of_similar_lengths(tokenizer):
    """`prefill_chunks` keeps one forward where padding is cheap and splits rows of sorted widths where it saves
    more padded tokens than a forward costs; the engine's prefill then runs one forward per chunk, and every
    output is what one forward for the whole group (no chunking) gives."""
    from minimind.infer.engine import prefill_chunks

    assert prefill_chunks([7], 32) == [(0, 1)]
    assert prefill_chunks([10, 10, 12], 32) == [(0, 3)]  # 6 padded tokens < a forward
    assert prefill_chunks([3, 3, 3, 3, 90, 90], 32) == [(0, 4), (4, 6)]  # 348 padded tokens > a forward
    chunks = prefill_chunks(sorted([16, 20, 30, 48, 47, 46, 18, 33] * 4), 32)
    assert chunks[0][0] == 0 and chunks[-1][1] == 32 and all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
    assert 1 < len(chunks) < 8
    model = random_model(3)
    prompts = prompts_of((40, 3, 2, 41, 4, 39, 3, 1), seed=4)
    forwards = []
    engine = Engine(model, tokenizer)
    forward = engine._forward
    engine._forward = lambda ids, *args, **kwargs: forwards.append(tuple(ids.shape)) or forward(ids, *args, **kwargs)
    chunked = engine.completions(prompts, max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=3)
    assert forwards[:2] == [(5, 4), (3, 48)]  # the five short prompts, then the three long ones (width rounded)
    whole = Engine(model, tokenizer)
    whole.prefill_forward_tokens = 10**9  # one forward, padded to the longest
    together = whole.completions(prompts, max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=3)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in together]


def test_prefill_widths_come_in_few_shapes_on_a_cpu(tokenizer):
    """A CPU engine whose matmuls run through oneDNN (prepacked weights, the default) rounds each prefill forward's
    width above 16 up to a multiple of 16: oneDNN keeps memory for every input shape it meets, so the lengths 17-60
    make three shapes, not 44; what each prompt samples is unchanged."""
    model = random_model(6)
    engine = Engine(model, tokenizer)
    assert engine.prefill_width_multiple == 16
    shapes = []
    forward = engine._forward
    engine._forward = lambda ids, *args, **kwargs: shapes.append(tuple(ids.shape)) or forward(ids, *args, **kwargs)
    prompts = prompts_of(tuple(range(17, 61)), seed=2)
    rounded = [engine.completions([p], max_new_tokens=3, temperature=0.0)[0].token_ids for p in prompts]
    prefills = {shape for shape in shapes if shape[1] > 1}
    assert {width for _, width in prefills} == {32, 48, 64}
    exact = Engine(model, tokenizer)
    exact.prefill_width_multiple = 1
    assert [exact.completions([p], max_new_tokens=3, temperature=0.0)[0].token_ids for p in prompts] == rounded
    # Float32 on plain weights (MKL, as RL rollouts run) keeps nothing per shape: no rounding.
    assert Engine(model, tokenizer, prepack=False).prefill_width_multiple == 1


def test_a_prompt_admitted_several_times_is_prefilled_once(tokenizer):
    """An RL group (or n samples of one prompt): identical prompts admitted together are prefilled in one row; the
    other rows copy its keys/values and first-token logits, and each row samples what it samples alone (row i
    seeded seed + i: the same draws, and the same log-probs up to float rounding)."""
    model = random_model(5)
    p, q = prompts_of((9, 14), seed=5)
    prompts = [p, q, p, p, q, p]
    forwards = []
    engine = Engine(model, tokenizer)
    forward = engine._forward
    engine._forward = lambda ids, *args, **kwargs: forwards.append(tuple(ids.shape)) or forward(ids, *args, **kwargs)
    grouped = engine.sample_ids(prompts, max_new_tokens=8, temperature=1.0, seed=11, stop_ids=())
    assert forwards[0] == (2, 14) and all(width == 1 for _, width in forwards[1:])  # p and q, once each
    assert [len(ids) for ids in grouped.token_ids] == [8] * 6
    for i, prompt in enumerate(prompts):
        alone = Engine(model, tokenizer).sample_ids([prompt], max_new_tokens=8, temperature=1.0, seed=11 + i,
                                                    stop_ids=())
        assert grouped.token_ids[i] == alone.token_ids[0]
        assert grouped.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-4)
    greedy = engine.completions([p] * 3, max_new_tokens=8, ignore_eos=True)
    assert all(c.token_ids == greedy[0].token_ids for c in greedy)
    scored = engine.completions([p, p], max_new_tokens=2, ignore_eos=True, prompt_logprobs=0)  # every position
    assert all(c.prompt_logprobs is not None and len(c.prompt_logprobs) == len(p) for c in scored)


def test_text_prompt_gets_bos_and_batch_returns_list(tokenizer):
    engine = Engine(random_model(), tokenizer)
    assert engine.encode("hello")[0] == tokenizer.bos_token_id
    assert engine.encode([5, 6]) == [5, 6]
    one = engine.generate("hello", max_new_tokens=5)
    both = engine.generate(["hello", "北京"], max_new_tokens=5)
    assert isinstance(one, str) and isinstance(both, list) and both[0] == one


def test_rows_stop_independently_and_finished_rows_do_not_disturb_others(tokenizer):
    model = random_model(3)
    prompts = prompts_of((4, 8, 6), seed=3)
    limits = (2, 9, 5)
    engine = Engine(model, tokenizer)
    ids = [engine.add(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, limits)]
    got: dict[int, list[int]] = {i: [] for i in ids}
    finished_at = {}
    step = 0
    while engine.has_work:
        step += 1
        for out in engine.step():
            got[out.request_id] += out.token_ids
            if out.finished:
                finished_at[out.request_id] = step
    assert [finished_at[i] for i in ids] == list(limits)
    for prompt, n, i in zip(prompts, limits, ids):
        assert got[i] == Engine(model, tokenizer).completions([prompt], max_new_tokens=n, ignore_eos=True)[0].token_ids


def test_continuous_batching_join_leave_and_cancel(tokenizer):
    model = random_model(4)
    a, b, c = prompts_of((5, 11, 3), seed=4)
    full = {name: Engine(model, tokenizer).completions([p], max_new_tokens=10, ignore_eos=True)[0].token_ids
            for name, p in (("a", a), ("b", b), ("c", c))}
    engine = Engine(model, tokenizer)
    got = {"a": [], "b": [], "c": []}
    names = {engine.add(a, max_new_tokens=10, ignore_eos=True): "a"}
    for _ in range(3):
        for out in engine.step():
            got[names[out.request_id]] += out.token_ids
    names[engine.add(b, max_new_tokens=10, ignore_eos=True)] = "b"  # joins a running batch
    waiting_c = engine.add(c, max_new_tokens=10, ignore_eos=True)
    engine.release(waiting_c)  # cancelled before it ever ran
    assert engine.num_waiting == 1
    for _ in range(2):
        for out in engine.step():
            got[names[out.request_id]] += out.token_ids
    a_id = next(i for i, n in names.items() if n == "a")
    engine.release(a_id)  # leaves mid-generation: its row is reused
    assert engine.num_running == 1
    names[engine.add(c, max_new_tokens=10, ignore_eos=True)] = "c"
    while engine.has_work:
        for out in engine.step():
            got[names[out.request_id]] += out.token_ids
    assert got["a"] == full["a"][:5]
    assert got["b"] == full["b"] and got["c"] == full["c"]
    engine.add(a)
    with pytest.raises(RuntimeError, match="step"):  # the high-level calls need the engine to themselves
        engine.generate("x")


def test_max_new_tokens_exact_and_context_policy(tokenizer):
    engine = Engine(random_model(max_seq_len=32), tokenizer)
    result = engine.completions(prompts_of((10,)), max_new_tokens=7, ignore_eos=True)[0]
    assert result.completion_tokens == len(result.token_ids) == 7 and result.finish_reason == "length"
    capped = engine.completions(prompts_of((29,)), max_new_tokens=50, ignore_eos=True)[0]
    assert capped.completion_tokens == 3 and capped.finish_reason == "length"  # 29 + 3 = max_seq_len
    assert engine.completions(prompts_of((31,)), max_new_tokens=5, ignore_eos=True)[0].completion_tokens == 1
    with pytest.raises(UserError, match="at most 31 tokens"):
        engine.generate(prompts_of((32,))[0])
    with pytest.raises(UserError, match="empty"):
        engine.generate([[]])
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate([5, 9999])
    assert not engine.has_work  # a failed batched add leaves nothing queued


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0), dict(presence_penalty=3),
                                 dict(logprobs=21), dict(logprobs=-1), dict(logprobs=True)])
def test_bad_sampling_parameters_are_user_errors(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_temperature_zero_is_deterministic_and_seeds_reproduce(tokenizer):
    engine = Engine(random_model(5), tokenizer)
    prompt = "MiniMind"
    assert engine.generate(prompt, max_new_tokens=12) == engine.generate(prompt, max_new_tokens=12)
    sample = dict(max_new_tokens=16, temperature=1.5, ignore_eos=True)
    first = engine.completions([prompt], seed=7, **sample)[0].token_ids
    assert engine.completions([prompt], seed=7, **sample)[0].token_ids == first
    others = {tuple(engine.completions([prompt], seed=s, **sample)[0].token_ids) for s in range(8, 12)}
    assert tuple(first) not in others and len(others) > 1
    # in a batch, prompt i uses seed + i, so each row reproduces the same prompt sampled alone
    batch = engine.completions([prompt, "北京", prompt], seed=7, **sample)
    assert batch[0].token_ids == first
    assert batch[2].token_ids == engine.completions([prompt], seed=9, **sample)[0].token_ids
    # a request's random numbers are its generator's, in order, however many it draws at once
    from minimind.infer.engine import UNIFORM_BLOCK, _Request

    request = _Request(0, [1], SamplingParams(), 1, None, torch.Generator().manual_seed(3))
    single = torch.Generator().manual_seed(3)
    assert [request.uniform() for _ in range(UNIFORM_BLOCK + 5)] == [
        float(torch.rand((), generator=single)) for _ in range(UNIFORM_BLOCK + 5)]


def test_top_k_one_and_tiny_top_p_are_greedy(tokenizer):
    engine = Engine(random_model(6), tokenizer)
    greedy = engine.generate("abc", max_new_tokens=10, ignore_eos=True)
    assert engine.generate("abc", max_new_tokens=10, ignore_eos=True, temperature=2.0, top_k=1, seed=1) == greedy
    assert engine.generate("abc", max_new_tokens=10, ignore_eos=True, temperature=2.0, top_p=1e-6, seed=2) == greedy
    assert engine.generate("abc", max_new_tokens=10, ignore_eos=True, temperature=2.0, min_p=1.0, seed=3) == greedy


def test_sample_rows_follows_filtered_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4, 4)
    # temperature, top_k, top_p, min_p, repetition, presence, frequency
    params = torch.tensor([[1, 0, 1, 0, 1, 0, 0], [1, 2, 1, 0, 1, 0, 0], [1, 0, 0.7, 0, 1, 0, 0],
                           [1, 0, 1, 0.2, 1, 0, 0]], dtype=torch.float32)
    expected = [probs, torch.tensor([0, 0.5, 0, 0.3]), torch.tensor([0, 0.5, 0, 0.3]),
                torch.tensor([0, 0.5, 0.15, 0.3])]
    n = 20000  # draws per parameter row, all in one call: (n * 4) rows
    uniforms = torch.rand(n * 4, generator=torch.Generator().manual_seed(0))
    draws = sample_rows(logits.repeat(n, 1), params.repeat(n, 1), uniforms).view(n, 4)
    for row, want in enumerate(expected):
        freq = torch.bincount(draws[:, row], minlength=4).float() / n
        torch.testing.assert_close(freq, want / want.sum(), atol=0.015, rtol=0)


def test_penalties_follow_ctrl_and_openai_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = torch.tensor([[1, 0, 1, 0, 2.0, 0.5, 0.25]])
    seen = torch.tensor([[True, True, False, True]])
    counts = torch.tensor([[0, 0, 0, 3]])
    out = apply_penalties(logits, params, seen, counts)
    # repetition: 2/2, -2*2, untouched, 0.5/2; then presence 0.5 and frequency 0.25*3 on the generated token
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.25 - 0.5 - 0.75]]))


def test_penalties_change_greedy_output_only_for_their_row(tokenizer):
    model = random_model(7)
    engine = Engine(model, tokenizer)
    prompt = prompts_of((6,), seed=7)[0]
    plain = engine.completions([prompt], max_new_tokens=24, ignore_eos=True)[0].token_ids
    penal = engine.completions([prompt], max_new_tokens=24, ignore_eos=True, frequency_penalty=2.0)[0].token_ids
    assert penal != plain
    a = engine.add(prompt, max_new_tokens=24, ignore_eos=True)
    b = engine.add(prompt, max_new_tokens=24, ignore_eos=True, frequency_penalty=2.0)
    got = {a: [], b: []}
    while engine.has_work:
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert got[a] == plain and got[b] == penal


def test_from_pretrained_chat_and_stats(model_dir):
    engine = Engine.from_pretrained(model_dir, device="cpu")
    messages = [{"role": "user", "content": "你好"}]
    answer = engine.chat(messages, max_new_tokens=6)
    stats = engine.last_stats
    assert stats.prompt_tokens == [len(engine.chat_prompt(messages))]
    assert stats.completion_tokens[0] <= 6 and stats.finish_reasons[0] in ("stop", "length")
    assert stats.tokens_per_second > 0
    assert "".join(engine.chat(messages, stream=True, max_new_tokens=6)) == answer
    assert engine.chat([messages, messages], max_new_tokens=6) == [answer, answer]


def test_logprobs_are_the_models_raw_log_softmax_and_change_no_token(tokenizer):
    """Each sampled token's logprob and its top-k are log_softmax of a full forward over prompt + output (before
    penalties and temperature), rows of a batch asking for different k or none at all; the tokens drawn are the
    same as without logprobs."""
    model = random_model(3)
    engine = Engine(model, tokenizer)
    prompts = prompts_of([5, 9, 3], seed=4)
    sample = dict(max_new_tokens=6, temperature=1.3, top_k=20, repetition_penalty=1.3, seed=11, ignore_eos=True)
    plain = engine.completions(prompts, **sample)
    with_k = engine.completions(prompts, logprobs=4, **sample)
    assert [c.token_ids for c in plain] == [c.token_ids for c in with_k] and plain[0].logprobs is None
    for prompt, completion in zip(prompts, with_k):
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        assert [e.token_id for e in completion.logprobs] == completion.token_ids
        for step, entry in enumerate(completion.logprobs):
            assert entry.logprob == pytest.approx(expected[step, entry.token_id].item(), abs=1e-4)
            values, ids_ = expected[step].topk(4)
            assert [t for t, _ in entry.top] == ids_.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    # prompt_logprobs: every prompt token after the first, prompts of different lengths prefilled together
    scored = engine.completions(prompts, max_new_tokens=1, prompt_logprobs=2)
    for prompt, completion in zip(prompts, scored):
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
        entries = completion.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None and completion.logprobs is None
        assert [e.logprob for e in entries[1:]] == pytest.approx(
            [expected[i, t].item() for i, t in enumerate(prompt[1:])], abs=1e-4)
        assert [[t for t, _ in e.top] for e in entries[1:]] == expected.topk(2).indices.tolist()
    # one row with logprobs, one with none, in one batch: each gets what it asked for
    engine.add(prompts[0], SamplingParams(max_new_tokens=2, logprobs=0))
    engine.add(prompts[1], SamplingParams(max_new_tokens=2))
    outputs = engine.step()
    assert outputs[0].logprobs is not None and outputs[0].logprobs[0].top == []
    assert outputs[1].logprobs is None


def test_unfiltered_sampling_is_drawn_in_one_pass_and_filtered_sampling_is_not(tokenizer):
    """Sampled requests with no top-k/top-p/min-p, penalty or bias go through the one-pass draw
    (`kernels.token_sampler`, where the CPU kernels are built), which gives each token's temperature-1 logprob;
    filtered ones take the general sampler."""
    from minimind.kernels import int_gemv

    model = random_model(3)
    engine = Engine(model, tokenizer)
    if engine._draw is None:  # a CPU without the kernels: the general sampler only
        assert not int_gemv.available()
        return
    draws = []
    kernel = engine._draw
    engine._draw = lambda *args: draws.append(args[0].shape[0]) or kernel(*args)
    prompts = prompts_of([5, 9, 3])
    plain = engine.completions(prompts, max_new_tokens=6, temperature=0.8, seed=1, logprobs=0, ignore_eos=True)
    assert sum(draws) == 3 * 6  # every token of every row
    for prompt, completion in zip(prompts, plain):
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        got = torch.tensor([entry.logprob for entry in completion.logprobs])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert all(entry.top == [] for entry in completion.logprobs)
    again = engine.completions(prompts, max_new_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
    assert [c.token_ids for c in again] == [c.token_ids for c in plain]  # the same seed, the same tokens
    draws.clear()
    for filtered in ({"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"repetition_penalty": 1.2},
                     {"logit_bias": {7: 5.0}}):
        engine.completions(prompts, max_new_tokens=3, temperature=0.8, seed=1, **filtered)
    assert draws == []
