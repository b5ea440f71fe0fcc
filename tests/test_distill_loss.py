"""The distillation loss from hidden states: the logits form's loss, metrics and gradients, no logits kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_head_loss import saved_bytes
from torch import nn

from minimind.kernels import head_loss
from minimind.kernels.training import TrainingLM
from minimind.lora import LoRALinear
from minimind.train.distill_loss import distill_head_loss, token_kl
from minimind.train.stages.distill import Distill

ROWS, DIM, TEACHER_DIM, VOCAB = 300, 32, 48, 700


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows, so 300 rows take five chunks, the last a partial one."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 64 * 4 * VOCAB)


def setup(seed=0):
    torch.manual_seed(seed)
    head, teacher_head = nn.Linear(DIM, VOCAB, bias=False), nn.Linear(TEACHER_DIM, VOCAB, bias=False)
    teacher_head.weight.requires_grad_(False)
    data = {"targets": torch.randint(0, VOCAB, (3, ROWS // 3)), "mask": (torch.rand(3, ROWS // 3) > 0.3).float(),
            "ce_weights": torch.where(torch.rand(3, ROWS // 3) > 0.8, 10.0, 1.0),
            "teacher_hidden": torch.randn(3, ROWS // 3, TEACHER_DIM) * 3, "teacher_head": teacher_head}
    return head, torch.randn(3, ROWS // 3, DIM), data


def logits_form(hidden, head, *, targets, mask, alpha, temperature, ce_weights, teacher_hidden, teacher_head):
    """The distillation loss as the reference project computes it: both models' whole logits."""
    student = head(hidden).float()
    nll = F.cross_entropy(student.transpose(1, 2), targets, reduction="none")
    kl = token_kl(teacher_head(teacher_hidden), student, temperature)
    loss = ((alpha * ce_weights * nll + (1 - alpha) * temperature**2 * kl) * mask).sum()
    return loss, (nll * mask).sum(), (kl * mask).sum()


def run(fn, head, hidden, **kwargs):
    hidden = hidden.clone().requires_grad_()
    loss, nll_sum, kl_sum = fn(hidden, head, **kwargs)
    loss.backward()
    weight_grad, head.weight.grad = head.weight.grad, None
    return [x.detach() for x in (loss, nll_sum, kl_sum)] + [hidden.grad, weight_grad]


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.0, 1.0), (1.0, 3.0)])
def test_loss_metrics_and_gradients_equal_the_logits_form(small_chunks, alpha, temperature):
    head, hidden, data = setup()
    expected = run(logits_form, head, hidden, alpha=alpha, temperature=temperature, **data)
    got = run(distill_head_loss, head, hidden, alpha=alpha, temperature=temperature, **data)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the evaluation path: chunked, no gradients
        for a, b in zip(distill_head_loss(hidden, head, alpha=alpha, temperature=temperature, **data), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_a_teacher_it_is_the_weighted_ce(small_chunks):
    head, hidden, data = setup(1)
    data.update(teacher_hidden=None, teacher_head=None)
    loss, nll_sum, kl_sum, hidden_grad, _ = run(distill_head_loss, head, hidden, **data)
    nll = F.cross_entropy(head(hidden).float().transpose(1, 2), data["targets"], reduction="none")
    torch.testing.assert_close(loss, (nll * data["ce_weights"] * data["mask"]).sum().detach())
    torch.testing.assert_close(nll_sum, (nll * data["mask"]).sum().detach())
    assert kl_sum.item() == 0.0
    assert (hidden_grad.reshape(-1, DIM)[data["mask"].reshape(-1) == 0] == 0).all()  # masked rows: no gradient


def test_a_lora_wrapped_head_takes_the_plain_form(small_chunks):
    head, hidden, data = setup(2)
    lora = LoRALinear(head, rank=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    expected = run(logits_form, lora, hidden, alpha=0.4, temperature=2.0, **data)
    got = run(distill_head_loss, lora, hidden, alpha=0.4, temperature=2.0, **data)
    for a, b in zip(got[:4], expected[:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_keeps_no_logits_for_backward(small_chunks):
    head, hidden, data = setup(3)
    hidden.requires_grad_()
    logits_bytes = ROWS * VOCAB * 4
    plain = saved_bytes(lambda: logits_form(hidden, head, alpha=0.5, temperature=2.0, **data))
    fused = saved_bytes(lambda: distill_head_loss(hidden, head, alpha=0.5, temperature=2.0, **data))
    assert plain >= 2 * logits_bytes
    assert fused <= (ROWS * DIM + VOCAB * DIM) * 4 < logits_bytes / 5


def test_distill_objective_gradients_equal_the_logits_form():
    """Through the student's forward (`head_loss_fn`), a teacher of another width, packed documents."""
    student, teacher = tiny_model(0).train(), tiny_model(1, dim=128, n_layers=4, n_heads=4, n_kv_heads=2)
    for param in teacher.parameters():
        param.requires_grad_(False)
    torch.manual_seed(4)
    ids = torch.randint(3, 512, (2, 41))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": (torch.rand(2, 40) > 0.4).float(),
             "doc_ids": torch.tensor([[0] * 25 + [1] * 15, [0] * 40]),
             "loss_weight": torch.where(torch.rand(2, 40) > 0.8, 10.0, 1.0)}
    inputs = {"input_ids": batch["input_ids"], "document_ids": batch["doc_ids"]}
    student.zero_grad()
    out = Distill(teacher, alpha=0.3, temperature=2.0)(student, batch)
    out.loss_sum.backward()
    ours = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    expected, _, kl_sum = logits_form(student.model(**inputs)[0], student.lm_head, targets=batch["labels"],
                                      mask=batch["loss_mask"], alpha=0.3, temperature=2.0,
                                      ce_weights=batch["loss_weight"],
                                      teacher_hidden=teacher.model(**inputs)[0], teacher_head=teacher.lm_head)
    expected.backward()
    torch.testing.assert_close(out.loss_sum.detach(), expected.detach())
    assert out.metrics["kl"] == pytest.approx((kl_sum / batch["loss_mask"].sum()).item(), rel=1e-5)
    for name, param in student.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_head_loss_fn_gets_the_final_hidden_states_and_head():
    model = tiny_model().eval()
    ids = torch.randint(3, 512, (2, 9))
    out = TrainingLM(model)(ids, head_loss_fn=lambda hidden, head: (hidden, head))
    assert out.logits is None and out.loss[1] is model.lm_head
    torch.testing.assert_close(model.lm_head(out.loss[0]), model(ids).logits)
