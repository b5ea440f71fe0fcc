"""The sorted MoE dispatch (minimind/kernels/moe.py) computes what the plain model's MoE computes: outputs, the
load-balancing loss and every gradient, for top-2 with a shared expert, top-1 renormalised, per-sequence
balancing, and an expert no token chose; a training run installs it."""

from __future__ import annotations

import pytest
import torch

from minimind.kernels import set_moe_dispatch, use_training_kernels
from minimind.kernels.moe import sorted_dispatch
from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.model.moe import MoEFeedForward

SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=128, max_seq_len=64)
CASES = {
    "top2-shared": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "top1-renormalised": dict(n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0, qk_norm=True,
                              norm_top1_prob=True, moe_intermediate_size=48),
    "top3-seq-aux": dict(n_routed_experts=5, num_experts_per_tok=3, n_shared_experts=2, seq_aux=True),
}


def moe_model(case: str) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    config = MiniMindConfig(**SHAPE, use_moe=True, aux_loss_alpha=0.1, **CASES[case])
    return MiniMindForCausalLM(config).train()


def loss_and_grads(model: MiniMindForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.logits.detach(), out.aux_loss.detach(), grads


@pytest.mark.parametrize("case", list(CASES))
def test_sorted_dispatch_matches_the_plain_moe_in_outputs_aux_loss_and_gradients(case):
    model = moe_model(case)
    ids = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    plain = loss_and_grads(model, ids)
    set_moe_dispatch(model, "sorted")
    assert all(m.dispatch_function is sorted_dispatch for m in model.modules() if isinstance(m, MoEFeedForward))
    ours = loss_and_grads(model, ids)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-5, atol=1e-6)
    assert plain[1] > 0
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-6, atol=0)
    for name, grad in plain[2].items():
        assert grad is not None and ours[2][name] is not None, name
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()  # inference through the installed dispatch gives the plain inference numbers too
    with torch.no_grad():
        sorted_logits = model(ids).logits
        set_moe_dispatch(model, "plain")
        torch.testing.assert_close(sorted_logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def without_expert_3(route):
    """A router `forward` that sends the slots it gave expert 3 to expert 2."""

    def forward(x: torch.Tensor):
        ids, weights, aux = route(x)
        return ids.clamp(max=2), weights, aux

    return forward


def test_an_expert_no_token_chose_still_gets_a_zero_gradient():
    model = moe_model("top2-shared")
    for module in model.modules():
        if isinstance(module, MoEFeedForward):  # route expert 3's slots to expert 2: expert 3 gets no token
            module.gate.forward = without_expert_3(module.gate.forward)
    set_moe_dispatch(model, "sorted")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    _, _, grads = loss_and_grads(model, ids)
    idle = grads["model.layers.0.mlp.experts.3.down_proj.weight"]
    assert idle is not None and torch.count_nonzero(idle) == 0
    assert torch.count_nonzero(grads["model.layers.0.mlp.experts.0.down_proj.weight"]) > 0


def test_training_installs_the_sorted_dispatch_unless_compiled():
    for compiled, expected in ((False, sorted_dispatch), (True, None)):
        model = moe_model("top1-renormalised")
        use_training_kernels(model, torch.device("cpu"), compiled=compiled)
        layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        assert len(layers) == 2 and all(m.dispatch_function is expected for m in layers)
