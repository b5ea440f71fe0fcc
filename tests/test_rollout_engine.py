"""RL rollouts through the inference Engine (`rollout.sample` -> `policy_engine` -> `Engine.sample_ids`): the
old-policy log-probs, masks and eos, seeds, left padding, the sampler's temperature/top-k, greedy, weights
that change between rollouts, and an FSDP-sharded policy on two gloo ranks."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_model

from minimind.errors import UserError
from minimind.infer.sampling import PARAM_COLUMNS, sample_rows
from minimind.kernels.training import TrainingLM
from minimind.train.rollout import left_pad, policy_engine, sample

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63], [1, 70]]
NO_EOS = 511  # a token id the tiny models below essentially never sample first


def batch(group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_pad(PROMPTS, 0)
    return ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


def full_forward_logprobs(model: torch.nn.Module, rollout) -> torch.Tensor:
    """log softmax (temperature 1) of one uncached forward over prompt + completion, at the sampled tokens (N, T)."""
    t = rollout.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                       logits_to_keep=t + 1).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (1.5, 0), (0.0, 0)])
def test_rollout_logprobs_are_the_temperature_one_log_softmax_of_a_full_forward(temperature, top_k):
    model = tiny_model(3)
    ids, mask = batch(group=3)
    rollout = sample(model, ids, mask, 8, eos_id=2, temperature=temperature, top_k=top_k, seed=11)
    full = full_forward_logprobs(model, rollout)
    torch.testing.assert_close(rollout.logprobs, full * rollout.completion_mask, rtol=0, atol=1e-5)
    assert (rollout.logprobs[rollout.completion_mask.bool()] < 0).all()
    if top_k:  # every sampled token is among the k likeliest at its position
        t = rollout.completion_ids.shape[1]
        with torch.no_grad():
            logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                           logits_to_keep=t + 1).logits[:, :-1]
        kth = logits.topk(top_k, -1).values[..., -1]
        chosen = logits.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
        assert (chosen >= kth)[rollout.completion_mask.bool()].all()


def test_masks_stop_each_row_at_its_first_eos_and_the_batch_when_all_have_stopped():
    model = tiny_model(4)
    ids, mask = batch()
    free = sample(model, ids, mask, 10, eos_id=NO_EOS, seed=3)
    assert free.completion_mask.all() and not free.finished.any() and free.completion_ids.shape[1] == 10
    # A token row 0 samples at step 3 or later (and not before) becomes eos: with the same seed every row draws
    # the same tokens, so row 0 stops there and the others at their first one, if any.
    row0 = free.completion_ids[0].tolist()
    eos = row0[next(i for i in range(2, 10) if row0[i] not in row0[:i])]
    stopped = sample(model, ids, mask, 10, eos_id=eos, seed=3)
    for row, tokens in enumerate(free.completion_ids.tolist()):
        n = tokens.index(eos) + 1 if eos in tokens else 10
        assert stopped.lengths()[row] == n and bool(stopped.finished[row]) == (eos in tokens)
        assert stopped.completion_ids[row, :n].tolist() == tokens[:n]  # same tokens up to the stop
        assert stopped.completion_ids[row, n:].eq(0).all() and stopped.logprobs[row, n:].eq(0).all()
        torch.testing.assert_close(stopped.logprobs[row, :n], free.logprobs[row, :n], rtol=0, atol=1e-6)
    assert stopped.completion_ids.shape[1] == int(stopped.lengths().max())  # no column past the last stop
    assert stopped.completion_mask.tolist() == [[1] * int(n) + [0] * (stopped.completion_ids.shape[1] - int(n))
                                                for n in stopped.lengths()]
    assert torch.equal(stopped.attention_mask, torch.cat([mask, stopped.completion_mask], 1))
    assert torch.equal(stopped.sequences[:, : ids.shape[1]], ids) and stopped.prompt_len == ids.shape[1]


def test_a_row_whose_first_token_is_eos_has_one_column():
    model = tiny_model(4)
    ids, mask = batch()
    first = sample(model, ids, mask, 1, eos_id=NO_EOS, temperature=0.0).completion_ids[:, 0].tolist()
    for row, token in enumerate(first):
        out = sample(model, ids[row : row + 1], mask[row : row + 1], 8, eos_id=token, temperature=0.0)
        assert out.completion_ids.tolist() == [[token]] and out.finished.all() and out.lengths().tolist() == [1]


def test_same_seed_same_rollout_and_rows_do_not_depend_on_their_batch():
    model = tiny_model(5)
    ids, mask = batch(group=2)

    def roll(seed=None):
        return sample(model, ids, mask, 8, eos_id=2, temperature=1.0, top_k=20, seed=seed)

    torch.manual_seed(7)
    a = roll()
    torch.manual_seed(7)
    b = roll()
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    torch.manual_seed(8)
    assert not torch.equal(roll().sequences, a.sequences)
    # Row i draws from seed + i: a row sampled alone with its seed gives the same completion.
    whole = roll(seed=100)
    for row in (0, 3, 7):
        alone = sample(model, ids[row : row + 1], mask[row : row + 1], 8, eos_id=2, temperature=1.0, top_k=20,
                       seed=100 + row)
        n = int(alone.lengths()[0])
        assert alone.completion_ids[0, :n].tolist() == whole.completion_ids[row, :n].tolist()
        assert int(whole.lengths()[row]) == n


def test_left_padded_prompts_of_different_lengths_decode_as_if_alone():
    model = tiny_model(6)
    ids, mask = batch()
    rollout = sample(model, ids, mask, 6, eos_id=NO_EOS, temperature=0.0)
    for row, prompt in enumerate(PROMPTS):
        alone = torch.tensor([prompt])
        with torch.no_grad():
            reference = model.generate(input_ids=alone, attention_mask=torch.ones_like(alone), max_new_tokens=6,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        assert rollout.completion_ids[row].tolist() == reference[0, len(prompt):].tolist()


def test_greedy_uses_no_randomness_and_is_the_argmax_chain():
    model = tiny_model(7)
    ids, mask = batch()
    state = torch.get_rng_state()
    greedy = sample(model, ids, mask, 5, eos_id=NO_EOS, temperature=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    t = greedy.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=greedy.sequences, attention_mask=greedy.attention_mask, logits_to_keep=t + 1).logits
    assert torch.equal(logits[:, :-1].argmax(-1), greedy.completion_ids)


def test_the_engine_follows_in_place_updates_and_never_changes_the_policy():
    policy = tiny_model(8).train()
    view = TrainingLM(policy)  # what the trainer hands the objective
    ids, mask = batch()
    classes = [type(m) for m in policy.modules()]
    strides = {name: p.stride() for name, p in policy.named_parameters()}
    before = sample(view, ids, mask, 6, eos_id=NO_EOS, temperature=0.0)
    engine = policy_engine(view, NO_EOS)
    # A fused AdamW step, as the trainer takes: it updates every weight in place without moving version counters.
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(policy.parameters(), lr=0.2, fused=True).step()
    after = sample(view, ids, mask, 6, eos_id=NO_EOS, temperature=0.0)
    assert policy_engine(view, NO_EOS) is engine  # reused, not rebuilt
    assert not torch.equal(before.completion_ids, after.completion_ids)
    torch.testing.assert_close(after.logprobs, full_forward_logprobs(policy, after), rtol=0, atol=1e-5)
    assert policy.training and [type(m) for m in policy.modules()] == classes
    assert {name: p.stride() for name, p in policy.named_parameters()} == strides
    # Parameters replaced rather than updated (a dtype move here): a new engine over the new tensors.
    policy.double()
    assert policy_engine(view, NO_EOS) is not engine
    torch.testing.assert_close(sample(view, ids, mask, 6, eos_id=NO_EOS, temperature=0.0).completion_ids,
                               after.completion_ids)


def test_ppo_actor_critic_samples_through_its_trunk_and_head():
    from minimind.train.stages.ppo import ActorCritic

    policy = tiny_model(9)
    ids, mask = batch()
    ours = sample(ActorCritic(policy), ids, mask, 5, eos_id=NO_EOS, temperature=0.0)
    assert torch.equal(ours.sequences, sample(policy, ids, mask, 5, eos_id=NO_EOS, temperature=0.0).sequences)


def test_sampler_draws_from_the_tempered_top_k_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(60_000, 5).contiguous()
    uniforms = torch.rand(60_000, generator=torch.Generator().manual_seed(0))
    for temperature, top_k in [(1.0, 0), (0.5, 0), (2.0, 3), (1.0, 1)]:
        params = torch.zeros(60_000, len(PARAM_COLUMNS))
        params[:, 0], params[:, 1], params[:, 2], params[:, 4] = temperature, top_k, 1.0, 1.0
        expected = torch.softmax(logits[0] / temperature, -1)
        if top_k:
            expected = torch.where(expected >= expected.topk(top_k).values[-1], expected, 0.0)
            expected /= expected.sum()
        freq = torch.bincount(sample_rows(logits, params, uniforms), minlength=5).float() / logits.shape[0]
        torch.testing.assert_close(freq, expected, rtol=0, atol=0.01)
        assert (freq[expected == 0] == 0).all()  # a filtered token is never drawn


def test_a_rows_draw_does_not_depend_on_what_its_batch_neighbours_ask_for():
    """Top-p in one row sorts the batch's vocabulary; the other rows still draw the same tokens."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    uniforms = torch.rand(64, generator=torch.Generator().manual_seed(2))
    params = torch.zeros(64, len(PARAM_COLUMNS))
    params[:, 0], params[:, 1], params[:, 2], params[:, 4] = 1.0, 7, 1.0, 1.0
    plain = sample_rows(logits, params, uniforms)
    params[0, 2] = 0.5  # row 0 alone asks for top-p
    mixed = sample_rows(logits, params, uniforms)
    assert torch.equal(plain[1:], mixed[1:])


def test_sample_ids_returns_ids_and_refuses_stop_strings(tokenizer):
    from minimind.infer.engine import Engine

    engine = Engine(tiny_model(3), tokenizer)
    out = engine.sample_ids(PROMPTS, max_new_tokens=4, temperature=0.0, stop_ids=[NO_EOS])
    texts = engine.completions(PROMPTS, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert out.token_ids == [c.token_ids for c in texts] and out.finish_reasons == ["length"] * 4
    assert [len(lp) for lp in out.logprobs] == [4] * 4 and engine.num_running == engine.num_waiting == 0
    with pytest.raises(UserError, match="stop strings need text"):
        engine.sample_ids(PROMPTS, stop=["x"])


def _sharded_worker(rank: int, init_file: str, results) -> None:
    """Two gloo ranks sampling one FSDP-sharded policy (different prompts per rank, and greedy rows that stop
    at different steps) against the same policy unsharded."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        policy, plain = tiny_model(10), tiny_model(10)
        view = TrainingLM(policy)
        for block in policy.model.layers:  # as `--strategy fsdp` does
            fully_shard(block)
        fully_shard(view)
        ids, mask = left_pad(PROMPTS[rank::2], 0)
        got, want = [], []
        for step in range(2):
            for temperature in (0.0, 1.0):
                got.append(sample(view, ids, mask, 6 + 4 * rank, eos_id=2, temperature=temperature, seed=5))
                want.append(sample(plain, ids, mask, 6 + 4 * rank, eos_id=2, temperature=temperature, seed=5))
            with torch.no_grad():  # the same in-place update on both: the sharded one's engine must see it
                for p, q in zip(view.parameters(), plain.parameters()):
                    p.add_(0.02 * (step + 1))  # a DTensor: each rank updates its shard
                    q.add_(0.02 * (step + 1))
        results[rank] = [(g.sequences.tolist(), w.sequences.tolist(), (g.logprobs - w.logprobs).abs().max().item())
                         for g, w in zip(got, want)]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_fsdp_sharded_policy_samples_like_the_unsharded_one_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    context = mp.spawn(_sharded_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("sampling deadlocked across ranks")
    for rank in (0, 1):
        assert len(results[rank]) == 4
        for sharded, plain, gap in results[rank]:
            assert sharded == plain and gap < 1e-5
        assert results[rank][0][0] != results[rank][2][0]  # the updated weights were used
