"""Packed rows: every document attends only to itself, exactly as if it were alone in its own row."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from minimind.kernels import use_training_kernels
from minimind.kernels.documents import Documents
from minimind.kernels.training import TrainingLM
from minimind.model.documents import document_mask, document_positions
from minimind.train.objective import MaskedLM

# Two rows of 64: documents of 1, 15, 16, 17, 40 and 2 tokens (buckets 16, 32, 64), then a padding run.
LENGTHS = [[1, 15, 16, 17, 15], [40, 2, 22]]
PAD_RUN = 15  # the first row's last 15 positions are padding


def packed_batch(seed: int = 0):
    torch.manual_seed(seed)
    doc_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in LENGTHS])
    doc_ids[0, -PAD_RUN:] = -1
    tokens = torch.randint(3, 512, doc_ids.shape)
    return tokens, doc_ids


def test_positions_restart_and_mask_is_block_diagonal():
    _, doc_ids = packed_batch()
    positions = document_positions(doc_ids)
    assert positions[0, :3].tolist() == [0, 0, 1] and positions[1, 40:43].tolist() == [0, 1, 0]
    mask = document_mask(doc_ids)[0, 0]
    assert mask[15, 1] and mask[15, 15] and not mask[15, 0] and not mask[15, 16]  # the 15-token document
    assert mask[17, 16] and not mask[17, 15]  # the next one starts at 16


@pytest.mark.parametrize("kernels", [False, True], ids=["mask", "documents"])
def test_each_document_gives_what_it_gives_alone(kernels):
    model = tiny_model()
    if kernels:
        use_training_kernels(model, torch.device("cpu"))
    tokens, doc_ids = packed_batch()
    with torch.no_grad():
        packed = model(tokens, document_ids=doc_ids).logits
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for d, n in enumerate(lengths):
                if row == 0 and d == len(lengths) - 1:
                    break  # the padding run
                alone = model(tokens[row:row + 1, start:start + n]).logits[0]
                torch.testing.assert_close(packed[row, start:start + n], alone, rtol=1e-5, atol=1e-5)
                start += n


def packed_and_masked(make_model, tokens: torch.Tensor, doc_ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(loss, gradients by name) of a packed batch through `Documents` (the CPU path), then through the
    block-diagonal mask (the GPU / compile path), each on a fresh `make_model()`."""
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids[:, :-1],
             "loss_mask": (doc_ids[:, 1:] >= 0).float()}
    results = []
    for masked in (False, True):
        model = make_model().train()
        if not masked:
            use_training_kernels(model, torch.device("cpu"))  # what the trainer selects on a CPU
        if masked:
            inputs = {"attention_mask": document_mask(batch["doc_ids"]),
                      "position_ids": document_positions(batch["doc_ids"])}
            loss = TrainingLM(model)(batch["input_ids"], **inputs, targets=batch["labels"],
                         target_weights=batch["loss_mask"]).loss
        else:
            loss = MaskedLM()(model, batch).loss_sum
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    return results


def test_per_document_attention_equals_the_masked_path_with_gradients():
    """Documents (the CPU path) against the block-diagonal mask (the GPU / compile path): loss and gradients."""
    grads = packed_and_masked(lambda: tiny_model(dropout=0.0), *packed_batch(1))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    for name, grad in grads[1][1].items():
        torch.testing.assert_close(grads[0][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_documents_bucket_by_power_of_two_width():
    _, doc_ids = packed_batch()
    widths = sorted(index.shape[1] for index, _ in Documents(doc_ids).groups)
    assert widths == [16, 32, 64]


def test_document_ids_with_a_mask_or_a_cache_is_a_clear_error():
    model = tiny_model()
    tokens, doc_ids = packed_batch()
    with pytest.raises(ValueError, match="document_ids"):
        model(tokens, attention_mask=torch.ones_like(tokens), document_ids=doc_ids)
    cache = model(tokens[:, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="document_ids"):
        model(tokens[:, 4:8], past_key_values=cache, document_ids=doc_ids[:, 4:8])
