"""The chunked head + cross-entropy the trainer uses: the plain logits path's loss and gradients, less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

from minimind.kernels import head_loss
from minimind.kernels.head_loss import head_cross_entropy, head_token_nll
from minimind.kernels.training import TrainingLM
from minimind.lora import LoRALinear
from minimind.train.objective import MaskedLM, model_inputs, token_nll

ROWS, DIM, VOCAB = 300, 32, 700


def plain_loss(hidden, head, targets, weights):
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()


def setup(seed=0, weight_grad=True):
    torch.manual_seed(seed)
    head = nn.Linear(DIM, VOCAB, bias=False)
    head.weight.requires_grad_(weight_grad)
    hidden = torch.randn(ROWS, DIM)
    targets = torch.randint(0, VOCAB, (ROWS,))
    weights = torch.rand(ROWS) * (torch.rand(ROWS) > 0.3)  # uneven weights, ~30% zero
    return head, hidden, targets, weights


def loss_and_grads(fn, head, hidden, targets, weights):
    hidden = hidden.clone().requires_grad_()
    loss = fn(hidden, head, targets, weights)
    loss.backward()
    weight_grad = head.weight.grad
    head.weight.grad = None
    return loss.detach(), hidden.grad, weight_grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows, so 300 rows take five chunks, the last a partial one."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 64 * 4 * VOCAB)
    assert head_loss.chunk_rows(VOCAB, torch.device("cpu")) == 64


def test_fused_loss_and_gradients_equal_the_logits_path(small_chunks):
    head, hidden, targets, weights = setup()
    expected = loss_and_grads(plain_loss, head, hidden, targets, weights)
    got = loss_and_grads(head_cross_entropy, head, hidden, targets, weights)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-6)
    assert (got[1][weights == 0] == 0).all()  # dropped rows get exactly zero gradient


def test_frozen_head_gets_no_gradient_and_no_grad_mode_gives_the_same_loss(small_chunks):
    head, hidden, targets, weights = setup(weight_grad=False)
    expected = loss_and_grads(plain_loss, head, hidden, targets, weights)
    got = loss_and_grads(head_cross_entropy, head, hidden, targets, weights)
    assert got[2] is None
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(hidden, head, targets, weights), expected[0],
                                   rtol=1e-5, atol=1e-4)


def test_all_zero_weights_give_zero_loss_and_gradients():
    head, hidden, targets, _ = setup()
    loss, hidden_grad, weight_grad = loss_and_grads(head_cross_entropy, head, hidden, targets, torch.zeros(ROWS))
    assert loss.item() == 0.0 and not hidden_grad.any() and not weight_grad.any()


def test_bf16_autocast_stays_close_to_the_logits_path():
    head, hidden, targets, weights = setup()

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    expected = loss_and_grads(under_autocast(plain_loss), head, hidden, targets, weights)
    got = loss_and_grads(under_autocast(head_cross_entropy), head, hidden, targets, weights)
    assert got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-2)
    for g, e in zip(got[1:], expected[1:]):
        assert (g - e).norm() / e.norm() < 2e-2


def test_a_wrapped_head_takes_the_plain_path_with_the_same_result():
    head, hidden, targets, weights = setup()
    lora = LoRALinear(head, rank=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)  # a nonzero update, so the adapter must be applied
    expected = loss_and_grads(plain_loss, lora, hidden, targets, weights)
    got = loss_and_grads(head_cross_entropy, lora, hidden, targets, weights)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "lora"])
def test_token_nll_and_its_gradients_equal_the_logits_path(small_chunks, wrapped):
    """`head_token_nll` (the RL log-probs): one nll per position, chunked, any per-position gradient."""
    head, hidden, targets, _ = setup()
    if wrapped:  # a LoRA head takes the plain path, with the same result
        head = LoRALinear(head, rank=4, alpha=8)
        nn.init.normal_(head.lora_B.weight)
    hidden, targets = hidden.view(3, 100, DIM), targets.view(3, 100)
    upstream = torch.randn(3, 100)  # a different gradient at every position, known only in backward
    results = []
    for fn in (lambda h: head_token_nll(h, head, targets),
               lambda h: F.cross_entropy(head(h).float().flatten(0, 1), targets.flatten(), reduction="none").view(3, 100)):
        h = hidden.clone().requires_grad_()
        nll = fn(h)
        (nll * upstream).sum().backward()
        weight = head.weight if not wrapped else head.lora_B.weight
        results.append((nll.detach(), h.grad, weight.grad.clone()))
        weight.grad = None
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # scoring only: the chunks are scored and dropped
        torch.testing.assert_close(head_token_nll(hidden, head, targets), results[1][0], rtol=1e-5, atol=1e-5)


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `step()` builds the graph."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def test_training_keeps_no_logits_for_backward(small_chunks):
    """The objective's graph holds no (tokens x vocab) tensor: only the hidden-state and weight gradients."""
    torch.manual_seed(0)
    head = nn.Linear(DIM, VOCAB, bias=False)
    hidden = torch.randn(ROWS, DIM, requires_grad=True)
    targets, weights = torch.randint(0, VOCAB, (ROWS,)), torch.ones(ROWS)
    logits_bytes = ROWS * VOCAB * 4
    plain = saved_bytes(lambda: plain_loss(hidden, head, targets, weights))
    fused = saved_bytes(lambda: head_cross_entropy(hidden, head, targets, weights))
    assert plain >= logits_bytes
    assert fused <= (ROWS * DIM + VOCAB * DIM) * 4 < logits_bytes / 5


def test_model_targets_path_is_masked_lm_of_the_logits():
    """`TrainingLM(model)(..., targets=, target_weights=)` (what MaskedLM calls) = Σ mask · nll of the model's
    logits."""
    model = tiny_model().train()
    torch.manual_seed(1)
    tokens = torch.randint(3, 512, (3, 41))
    mask = (torch.rand(3, 40) > 0.4).float()
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    expected = (token_nll(model(**model_inputs(batch)).logits, batch["labels"]) * mask).sum()
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = TrainingLM(model)(**model_inputs(batch), targets=batch["labels"], target_weights=mask)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=1e-4)
    loss = MaskedLM()(model, batch).loss_sum
    loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def per_row_plain(hidden, head, targets, weights):
    nll = F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), reduction="none")
    return (nll.view(targets.shape) * weights).sum(-1)


def test_per_row_sums_and_their_gradients_equal_the_logits_path(small_chunks):
    """DPO's form: one Σ w·nll per row, then a different gradient per row; backward recomputes the logits."""
    head, hidden, targets, weights = setup()
    hidden, targets, weights = hidden.view(3, 100, DIM), targets.view(3, 100), weights.view(3, 100)
    upstream = torch.tensor([0.5, -2.0, 1.5])

    def per_row(fn, autocast=False):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = fn(h, head, targets, weights)
        (sums * upstream).sum().backward()  # outside autocast, as the trainer runs backward
        weight_grad = head.weight.grad
        head.weight.grad = None
        return sums.detach(), h.grad, weight_grad

    def fused(h, head, targets, weights):
        return head_cross_entropy(h, head, targets, weights, per_row=True)

    expected, got = per_row(per_row_plain), per_row(fused)
    assert got[0].shape == (3,)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused(hidden, head, targets, weights), expected[0], rtol=1e-5, atol=1e-5)
    expected, got = per_row(per_row_plain, autocast=True), per_row(fused, autocast=True)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-2)
    for g, e in zip(got[1:], expected[1:]):
        assert (g - e).norm() / e.norm() < 2e-2


def test_per_row_keeps_no_logits_for_backward(small_chunks):
    torch.manual_seed(0)
    head = nn.Linear(DIM, VOCAB, bias=False)
    hidden = torch.randn(3, 100, DIM, requires_grad=True)
    targets, weights = torch.randint(0, VOCAB, (3, 100)), torch.ones(3, 100)
    fused = saved_bytes(lambda: head_cross_entropy(hidden, head, targets, weights, per_row=True))
    # The hidden states and the weight (by reference), plus a few per-position ids and weights.
    assert fused <= (ROWS * DIM + VOCAB * DIM) * 4 + ROWS * 32 < ROWS * VOCAB * 4 / 5


def test_training_lm_is_the_causal_lm_under_the_same_names():
    """What the strategies wrap: the causal LM's parameters under its own names (checkpoints, FSDP state), its
    logits when asked for no loss, and `plain_model` gives back the causal LM that is saved."""
    from minimind.kernels.training import plain_model, training_view

    model = tiny_model().eval()
    wrapped = training_view(model)
    assert isinstance(wrapped, TrainingLM) and training_view(wrapped) is wrapped and plain_model(wrapped) is model
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]
    ids = torch.randint(3, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert wrapped.train().lm.training and not wrapped.eval().lm.training
