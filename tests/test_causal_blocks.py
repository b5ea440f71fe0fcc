"""CPU training attention in GEMM blocks (minimind/kernels/causal_blocks.py) computes SDPA's causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_model import llama_twin, randomize

from minimind.kernels import causal_blocks, use_training_kernels
from minimind.kernels.causal_blocks import MIN_LENGTH, causal_block_attention
from minimind.kernels.training import TrainingLM
from minimind.model.documents import document_mask, document_positions
from minimind.train.objective import MaskedLM


def qkv(b, h, kv, t, d, dtype=torch.float64, seed=0):
    """Queries, keys and values laid out as the model makes them: heads of one (B, T, heads, D) projection."""
    torch.manual_seed(seed)
    base = torch.randn(b, t, h + 2 * kv, d, dtype=dtype).transpose(1, 2)
    return [x.clone().requires_grad_() for x in (base[:, :h], base[:, h : h + kv], base[:, h + kv :])]


def sdpa_and_grads(q, k, v, grad):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out, torch.autograd.grad(out, (q, k, v), grad)


@pytest.mark.parametrize(
    "b, h, kv, t, d, block",
    [(2, 8, 2, 100, 16, 32), (1, 4, 4, 64, 8, 32), (3, 6, 3, 37, 8, 8), (2, 4, 1, 20, 8, 32), (1, 8, 2, 130, 64, 32)],
    ids=["gqa-uneven-last-block", "no-gqa", "three-heads-per-kv", "one-block-shorter-than-block", "head-dim-64"],
)
def test_blocks_equal_sdpa_values_and_gradients(b, h, kv, t, d, block):
    q, k, v = qkv(b, h, kv, t, d)
    out = causal_block_attention(q, k, v, block)
    grad = torch.randn_like(out)
    want, want_grads = sdpa_and_grads(q, k, v, grad)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), want_grads):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)
    # Laid out as (B, T, H, D): merging the heads for the output projection copies nothing.
    assert out.transpose(1, 2).is_contiguous()


def test_blocks_pass_gradcheck():
    q, k, v = qkv(1, 4, 2, 13, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: causal_block_attention(q, k, v, 5), (q, k, v))


def test_backward_keeps_no_square_tensor():
    """Like flash attention, nothing of (T x T) size is kept for backward: the probabilities are recomputed."""
    b, h, kv, t, d = 2, 8, 2, 256, 16
    q, k, v = qkv(b, h, kv, t, d, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        causal_block_attention(q, k, v)
    assert saved and max(saved) == b * h * t * d  # the queries and the output, in block rows


def assert_training_step_equal(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor) -> None:
    """The language-model loss of `ids` and every parameter's gradient agree between the two models (`ids` must
    not hold the reference's padding_idx, whose embedding row HF never trains)."""
    padding = reference.get_input_embeddings().padding_idx
    assert padding is None or not (ids == padding).any(), "ids hold the reference embedding's padding_idx"
    loss = model(ids, labels=ids).loss
    loss.backward()
    reference_loss = reference(ids, labels=ids).loss
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_model_routes_cpu_fp32_training_through_blocks_and_matches_hf(monkeypatch):
    """A training forward of a length the blocks serve goes through them, with the loss and every gradient of HF
    Llama's (SDPA); under no_grad, or shorter than MIN_LENGTH, SDPA runs."""
    calls = []
    real = causal_blocks._CausalBlocks.apply
    monkeypatch.setattr(causal_blocks._CausalBlocks, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    model = tiny_model(n_heads=8, n_kv_heads=2, dim=128, max_seq_len=512).train()
    randomize(model)
    hf = llama_twin(model).train()
    use_training_kernels(model, torch.device("cpu"))  # what the trainer selects for a CPU run
    # Not token 0: HF's embedding takes the pad id as padding_idx and never gives its row a gradient. Seeded, so
    # the draw does not depend on what ran before.
    ids = torch.randint(1, model.config.vocab_size, (2, MIN_LENGTH + 17), generator=torch.Generator().manual_seed(4))
    assert_training_step_equal(model, hf, ids)
    assert len(calls) == model.config.n_layers
    calls.clear()
    with torch.no_grad():
        model(ids)
    model(ids[:, : MIN_LENGTH - 1]).logits.sum().backward()
    assert not calls


def test_packed_documents_of_block_length_equal_the_masked_path(monkeypatch):
    """A packed row whose long document goes through the blocks (SFT's path on CPU) gives the loss and gradients
    of the block-diagonal mask with SDPA."""
    calls = []
    real = causal_blocks._CausalBlocks.apply
    monkeypatch.setattr(causal_blocks._CausalBlocks, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 350 + [1] * 30 + [-1] * 20])
    tokens = torch.randint(3, 512, doc_ids.shape)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids[:, :-1],
             "loss_mask": (doc_ids[:, 1:] >= 0).float()}
    results = []
    for masked in (False, True):
        model = tiny_model(dropout=0.0, max_seq_len=512).train()
        randomize(model)
        if not masked:
            use_training_kernels(model, torch.device("cpu"))
        if masked:
            loss = TrainingLM(model)(batch["input_ids"], attention_mask=document_mask(batch["doc_ids"]),
                         position_ids=document_positions(batch["doc_ids"]), targets=batch["labels"],
                         target_weights=batch["loss_mask"]).loss
        else:
            loss = MaskedLM()(model, batch).loss_sum
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert [shape[2] for shape in calls] == [512] * model.config.n_layers  # the 350-token document's bucket
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    for name, grad in results[1][1].items():
        scale = grad.abs().max().item()  # a summed loss over randomized weights: gradients up to ~50
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.slow
def test_blocks_traced_by_torch_compile_equal_sdpa():
    """Under torch.compile the blocks are traced (64 positions each, `COMPILED_BLOCK`): values and gradients."""
    q, k, v = qkv(1, 4, 2, 130, 8, dtype=torch.float32)
    out = torch.compile(causal_block_attention)(q, k, v)
    grad = torch.randn_like(out)
    want, want_grads = sdpa_and_grads(q, k, v, grad)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_kernels_are_chosen_once_by_device_and_compile():
    """What `use_training_kernels` installs (the strategies call it before wrapping): on a CPU the blocks, per-
    document attention unless compiled, the RMSNorm backward; on a GPU only the RMSNorm backward; a model built
    with flash_attn off keeps its written-out attention and the mask."""
    from minimind.kernels import ATTENTION_IMPLEMENTATIONS, DOCUMENT_IMPLEMENTATIONS, NORM_IMPLEMENTATIONS
    from minimind.kernels.documents import Documents

    def chosen(model):
        attention = model.model.layers[0].self_attn.attention_function
        names = {fn: name for name, fn in ATTENTION_IMPLEMENTATIONS.items()}
        documents = {fn: name for name, fn in DOCUMENT_IMPLEMENTATIONS.items()}
        norms = {fn: name for name, fn in NORM_IMPLEMENTATIONS.items()}
        return (names[attention], documents[model.model.document_attention],
                norms[model.model.norm.norm_function])

    assert chosen(tiny_model()) == ("sdpa", "mask", "plain")
    for device, compiled, want in [("cpu", False, ("causal_blocks", "documents", "hand_backward")),
                                   ("cpu", True, ("causal_blocks", "mask", "hand_backward")),
                                   ("cuda", False, ("sdpa", "mask", "hand_backward"))]:
        model = tiny_model()
        use_training_kernels(model, torch.device(device), compiled)
        assert chosen(model) == want, (device, compiled)
    eager = tiny_model(flash_attn=False)
    use_training_kernels(eager, torch.device("cpu"))
    assert chosen(eager) == ("eager", "mask", "hand_backward")
    assert DOCUMENT_IMPLEMENTATIONS["documents"] is Documents
