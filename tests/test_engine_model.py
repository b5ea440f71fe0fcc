"""The Engine never rewrites the model it is given: it decodes with its own modules over the same weights, and
says what the weight copies it makes cost."""

from __future__ import annotations

import pytest
import torch
from test_engine import prompts_of, random_model

from minimind.infer import Engine
from minimind.infer.layout import PackedLinear, _onednn_linear_works
from minimind.infer.quantize import Int8Linear

PROMPT = prompts_of((7,))[0]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything an engine could have changed in place: module classes and plain attributes (flags such as
    `training`), and each parameter's and buffer's storage, strides, dtype, device and version."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        "modules": [(name, type(m), {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))})
                    for name, m in model.named_modules()],
        "tensors": {name: (t.data_ptr(), t.stride(), t.dtype, t.device, t.requires_grad, t._version)
                    for name, t in tensors.items()},
    }


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct nn.Linear weights (the tied head shares the embedding's)."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(w.numel() * w.element_size() for w in weights.values())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prepack": False},
        {"quantize": "int8"},
        pytest.param({"compile": True}, marks=pytest.mark.slow),
    ],
    ids=["default", "no-prepack", "int8", "compile"],
)
def test_building_and_running_an_engine_leaves_the_model_as_it_was(tokenizer, options):
    model = random_model()
    model.train()  # a model mid-training: the engine must not switch it to eval
    before, want = snapshot(model), logits(model)
    engine = Engine(model, tokenizer, device="cpu", **options)
    got = engine.completions([PROMPT], max_new_tokens=5, ignore_eos=True)[0].token_ids
    assert len(got) == 5
    assert snapshot(model) == before
    assert torch.equal(logits(model), want)
    assert engine.model is not model
    if options.get("quantize") == "int8":
        assert isinstance(engine.model.lm_head, Int8Linear) and not isinstance(model.lm_head, Int8Linear)


def test_what_the_engine_copies_is_counted(tokenizer):
    model = random_model()
    ours = {p.data_ptr() for p in model.parameters()}
    head = model.lm_head.weight
    head_bytes = head.numel() * head.element_size()

    unpacked = Engine(model, tokenizer, prepack=False)
    assert {p.data_ptr() for p in unpacked.model.parameters()} == ours  # the same weights, no second copy
    assert unpacked.weight_copy_bytes == head_bytes  # only the output head's transposed copy

    packed = Engine(model, tokenizer)
    # one prepacked copy of each weight (without oneDNN: column-major copies of the projections and the head's
    # transposed copy, as many bytes)
    assert packed.weight_copy_bytes == linear_weight_bytes(model)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules()) == _onednn_linear_works(torch.float32)

    int8 = Engine(model, tokenizer, quantize="int8")
    # int8 weights (a quarter of the float bytes, plus per-channel scales) beside the shared float ones
    assert 0 < int8.weight_copy_bytes < linear_weight_bytes(model) // 3


def test_an_engine_follows_in_place_updates_of_the_models_weights(tokenizer):
    """Its modules share the caller's weight storage, so an optimizer step or load_state_dict on the model is
    what the engine decodes with next (prepacked copies are rebuilt when a weight's version moves)."""
    model, other = random_model(0), random_model(1)
    engine = Engine(model, tokenizer)
    first = engine.completions([PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids
    model.load_state_dict(other.state_dict())
    updated = engine.completions([PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert updated == Engine(other, tokenizer).completions([PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert updated != first


def test_a_loaded_model_is_prepared_in_place_at_no_extra_cost(model_dir):
    """`from_pretrained` owns the model it loads, so the column-major layout replaces the weights instead of
    copying them."""
    engine = Engine.from_pretrained(model_dir, prepack=False)
    assert engine.model.model.layers[0].mlp.up_proj.weight.t().is_contiguous()
    head = engine.model.lm_head.weight
    assert engine.weight_copy_bytes == head.numel() * head.element_size()
