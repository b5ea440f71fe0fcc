"""The Engine's prefix cache: the same tokens and log-probabilities with and without it (multi-turn chats,
concurrent requests sharing a system prompt, a prompt equal to a cached prefix, eviction under a tiny bound,
QK-norm + YaRN; int8 and int4 reuse nothing), what it counts, and the CLI flags."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_engine import prompts_of, random_model

from minimind.infer import Engine
from minimind.infer.options import add_prefix_cache_arguments
from minimind.infer.prefix import PrefixCache

LOGPROB_TOLERANCE = 1e-4  # reused keys/values come from another forward's shapes: equal up to rounding


def run_turns(engine: Engine, turns: list[list[int]], **sampling) -> tuple[list, list[int]]:
    """A multi-turn exchange in token ids: each prompt is the previous prompt + its answer + the next user turn.
    -> (each turn's Completion, each turn's prompt tokens taken from the prefix cache)."""
    history: list[int] = []
    results, reused = [], []
    for turn in turns:
        prompt = history + turn
        request = engine.add(prompt, **sampling)
        outputs = []
        while not (outputs and outputs[-1].finished):
            outputs += [o for o in engine.step() if o.request_id == request]
        reused.append(outputs[0].cached_tokens)
        results.append(outputs)
        history = prompt + [t for o in outputs for t in o.token_ids]
    return results, reused


def assert_same_outputs(ours: list, theirs: list) -> None:
    """Token ids equal; log-probabilities (when asked for) equal to rounding."""
    for a, b in zip(ours, theirs, strict=True):
        assert [t for o in a for t in o.token_ids] == [t for o in b for t in o.token_ids]
        if a[0].logprobs is not None:
            got = torch.tensor([e.logprob for o in a for e in o.logprobs])
            want = torch.tensor([e.logprob for o in b for e in o.logprobs])
            torch.testing.assert_close(got, want, atol=LOGPROB_TOLERANCE, rtol=0)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0, logprobs=2),
    dict(temperature=0.9, top_p=0.95, repetition_penalty=1.3, seed=5, logprobs=0),
], ids=["greedy", "seeded"])
def test_a_multi_turn_chat_is_the_same_with_and_without_the_prefix_cache(tokenizer, sampling):
    model = random_model(4)
    turns = prompts_of((12, 7, 9, 5), seed=4)
    plain, none_reused = run_turns(Engine(model, tokenizer), turns, max_new_tokens=6, ignore_eos=True, **sampling)
    cached_engine = Engine(model, tokenizer, prefix_cache_tokens=1024)
    cached, reused = run_turns(cached_engine, turns, max_new_tokens=6, ignore_eos=True, **sampling)
    assert_same_outputs(cached, plain)
    assert none_reused == [0, 0, 0, 0]
    # turn k reuses the whole previous prompt and answer except the answer's last token (never fed back)
    history = [len(t) for t in turns]
    assert reused == [0] + [sum(history[:k]) + 6 * k - 1 for k in range(1, 4)]
    stats = cached_engine.prefix_cache_stats
    assert stats.hit_tokens == sum(reused) and stats.query_tokens == sum(sum(history[:k]) + 6 * (k - 1)
                                                                           for k in range(1, 5))
    assert stats.entries == 1  # each turn's entry covers the one before
    assert stats.bytes == stats.tokens * 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x fp32


def test_concurrent_requests_sharing_a_system_prompt(tokenizer):
    model = random_model(5)
    system = prompts_of((20,), seed=50)[0]
    questions = prompts_of((4, 9, 6, 3), seed=51)
    first, rest = system + questions[0], [system + q for q in questions[1:]]
    alone = Engine(model, tokenizer).completions([first, *rest], max_new_tokens=8, ignore_eos=True)
    engine = Engine(model, tokenizer, prefix_cache_tokens=1024)
    assert engine.completions([first], max_new_tokens=8, ignore_eos=True)[0].token_ids == alone[0].token_ids
    ids = [engine.add(p, max_new_tokens=8, ignore_eos=True) for p in rest]  # admitted together, one prefill
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    reused: dict[int, int] = {}
    while engine.has_work:
        for out in engine.step():
            reused.setdefault(out.request_id, out.cached_tokens)
            tokens[out.request_id] += out.token_ids
    assert [tokens[i] for i in ids] == [c.token_ids for c in alone[1:]]
    held = first + alone[0].token_ids[:-1]
    assert [reused[i] for i in ids] == [common_prefix(p, held) for p in rest]
    assert all(reused[i] >= len(system) for i in ids)


def test_a_group_mixing_reused_and_fresh_prompts_is_prefilled_by_what_is_left(tokenizer):
    """Prompts admitted together, some with most of their tokens in the prefix cache: the rows are ordered by the
    tokens left to prefill, so the reused ones share a short forward and the fresh ones a long one, with the tokens
    of an engine without the cache."""
    model = random_model(5)
    system = prompts_of((40,), seed=60)[0]
    fresh = prompts_of((41, 43), seed=61)
    reusing = [system + q for q in prompts_of((2, 3), seed=62)]
    group = [fresh[0], reusing[0], fresh[1], reusing[1]]  # alternating, as requests may arrive
    alone = Engine(model, tokenizer).completions(group, max_new_tokens=6, ignore_eos=True)
    engine = Engine(model, tokenizer, prefix_cache_tokens=1024)
    engine.completions([system + [7]], max_new_tokens=1, ignore_eos=True)  # the system prompt in the cache
    forwards = []
    forward = engine._forward
    engine._forward = lambda ids, *args, **kwargs: forwards.append(tuple(ids.shape)) or forward(ids, *args, **kwargs)
    together = engine.completions(group, max_new_tokens=6, ignore_eos=True)
    assert forwards[:2] == [(2, 3), (2, 48)]  # what is left of the two reusing prompts, then the two fresh ones (43
    # tokens, the width rounded up to a multiple of 16)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_a_prompt_equal_to_a_cached_sequence_prefills_its_last_token(tokenizer):
    model = random_model(6)
    prompt = prompts_of((15,), seed=6)[0]
    engine, plain = Engine(model, tokenizer, prefix_cache_tokens=256), Engine(model, tokenizer)
    answer = engine.completions([prompt], max_new_tokens=5, ignore_eos=True)[0].token_ids
    held = prompt + answer[:-1]  # what the finished row held
    for again in (prompt, held, prompt[:9]):
        engine.add(again, max_new_tokens=4, ignore_eos=True)
        (out,) = engine.step()
        assert out.cached_tokens == len(again) - 1
        engine.release(out.request_id)
        assert engine.completions([again], max_new_tokens=4, ignore_eos=True)[0].token_ids == \
            plain.completions([again], max_new_tokens=4, ignore_eos=True)[0].token_ids


def test_eviction_keeps_the_bound_and_the_most_recent_sequences(tokenizer):
    model = random_model(7)
    prompts = prompts_of((10, 11, 12, 40), seed=7)
    engine, plain = Engine(model, tokenizer, prefix_cache_tokens=30), Engine(model, tokenizer)
    for p in prompts[:3]:
        engine.completions([p], max_new_tokens=4, ignore_eos=True)
        assert engine.prefix_cache_stats.tokens <= 30
    assert engine.prefix_cache_stats.entries == 2  # 13 + 14 + 15 > 30: the first one went
    for p in prompts[:3]:
        got = engine.completions([p + [9]], max_new_tokens=4, ignore_eos=True, logprobs=0)[0]
        want = plain.completions([p + [9]], max_new_tokens=4, ignore_eos=True, logprobs=0)[0]
        assert got.token_ids == want.token_ids
    engine.completions([prompts[3]], max_new_tokens=4, ignore_eos=True)  # longer than the bound: its first 30
    stats = engine.prefix_cache_stats
    assert (stats.entries, stats.tokens) == (1, 30)
    before = stats.hit_tokens
    longer = prompts[3] + [5, 6]
    assert engine.completions([longer], max_new_tokens=4, ignore_eos=True)[0].token_ids == \
        plain.completions([longer], max_new_tokens=4, ignore_eos=True)[0].token_ids
    assert engine.prefix_cache_stats.hit_tokens - before == 30


@pytest.mark.parametrize("variant", ["minimind3-yarn", "int8", "int4"])
def test_qk_norm_yarn_and_quantized_models_give_the_same_outputs(tokenizer, variant):
    overrides = {"minimind3-yarn": dict(qk_norm=True, rope_theta=1e6, head_dim=24, yarn_factor=4.0,
                                        yarn_original_max_seq_len=64)}.get(variant, {})
    kwargs = {"quantize": variant} if variant in ("int8", "int4") else {}
    model = random_model(8, **overrides)
    turns = prompts_of((30, 20, 25), seed=8)
    plain, _ = run_turns(Engine(model, tokenizer, **kwargs), turns, max_new_tokens=5, ignore_eos=True, logprobs=0)
    cached, reused = run_turns(Engine(model, tokenizer, prefix_cache_tokens=512, **kwargs), turns,
                               max_new_tokens=5, ignore_eos=True, logprobs=0)
    if kwargs:  # activations rounded by the forward's size: reuse would change the numbers, so none
        assert reused == [0, 0, 0]
    else:
        assert reused[1] > 30 and reused[2] > reused[1]
    assert_same_outputs(cached, plain)


def test_prompt_logprobs_and_weight_refresh_reuse_nothing(tokenizer):
    model = random_model(9)
    prompt = prompts_of((10,), seed=9)[0]
    engine = Engine(model, tokenizer, prefix_cache_tokens=256)
    engine.completions([prompt], max_new_tokens=3, ignore_eos=True)
    scored = engine.completions([prompt + [4]], max_new_tokens=3, ignore_eos=True, prompt_logprobs=1)[0]
    plain = Engine(model, tokenizer).completions([prompt + [4]], max_new_tokens=3, ignore_eos=True,
                                                 prompt_logprobs=1)[0]
    assert [e and e.logprob for e in scored.prompt_logprobs] == [e and e.logprob for e in plain.prompt_logprobs]
    assert engine.prefix_cache_stats.hit_tokens == 0
    engine.refresh_weights()  # the weights may have changed: nothing old may be reused
    assert engine.prefix_cache_stats.entries == 0
    assert Engine(model, tokenizer).prefix_cache_stats is None  # off unless asked for


def test_engine_flags_turn_the_prefix_cache_on_by_default(model_dir, cli_engines, capsys):
    from minimind.cli import main

    parser = argparse.ArgumentParser()
    add_prefix_cache_arguments(parser)
    assert parser.parse_args([]).prefix_cache_tokens > 0
    assert parser.parse_args(["--no-prefix-cache"]).prefix_cache_tokens == 0
    assert parser.parse_args(["--prefix-cache-tokens", "100"]).prefix_cache_tokens == 100
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefix-cache-tokens", "-1"])
    for flags in ([], ["--prefix-cache-tokens", "64"], ["--no-prefix-cache"]):
        assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2",
                     "--temperature", "0", "--device", "cpu", *flags]) == 0
    bounds = [None if e.prefix_cache is None else e.prefix_cache.max_tokens for e in cli_engines]
    assert bounds == [parser.parse_args([]).prefix_cache_tokens, 64, None]
    with pytest.raises(ValueError):
        PrefixCache(0, 8)


def test_the_server_reuses_a_shared_system_prompt_and_counts_it_in_metrics(tokenizer):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from minimind.serve.app import ServeConfig, create_app
    from minimind.serve.scheduler import Scheduler

    system = {"role": "system", "content": "You answer in one short sentence about the weather in 北京 today."}
    asks = [[system, {"role": "user", "content": text}] for text in ("hi there", "hello again", "what now")]
    model = random_model(10)

    def answers_and_counters(prefix_cache_tokens: int) -> tuple[list[str], dict[str, float]]:
        engine = Engine(model, tokenizer, max_batch_size=4, prefix_cache_tokens=prefix_cache_tokens)
        with TestClient(create_app(Scheduler(engine), ServeConfig(["tiny"]))) as client:
            answers = [client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6,
                                                                  "temperature": 0}).json()
                       for messages in asks]
            text = client.get("/metrics").text
        counters = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                    if s.name.startswith("minimind:prefix_cache")}
        return [a["choices"][0]["message"]["content"] for a in answers], counters

    plain, off = answers_and_counters(0)
    cached, on = answers_and_counters(512)
    assert cached == plain
    assert off["minimind:prefix_cache_hits_total"] == 0 and off["minimind:prefix_cache_queries_total"] > 0
    system_tokens = len(tokenizer.encode(tokenizer.apply_chat_template([system], tokenize=False),
                                         add_special_tokens=False))
    assert system_tokens > 10
    assert on["minimind:prefix_cache_hits_total"] >= 2 * (system_tokens - 1)
    assert on["minimind:prefix_cache_queries_total"] == off["minimind:prefix_cache_queries_total"]
    assert on["minimind:prefix_cache_queries_total"] > on["minimind:prefix_cache_hits_total"]
