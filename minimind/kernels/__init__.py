"""Faster implementations beside the plain model, each chosen once, at set-up, by the trainer or the Engine.

`minimind.model` is the plain transformer (what a model directory ships); its attention layers, RMSNorms and
body call an implementation stored on the module (`set_attention`, `set_document_attention` and `set_norm`
install one by name). What each user selects:

- training (`use_training_kernels`): the hand-written RMSNorm backward (rmsnorm.py), MoE experts run on their
  tokens sorted by expert (moe.py, eager steps); on a CPU also causal GEMM blocks (causal_blocks.py) and
  per-document attention for packed rows (documents.py);
- the Engine (`use_decode_kernels`): on a CPU, one-query attention as two matmuls for eager bf16/fp16 decoding,
  through the `one_query_attention` kernel (int_gemv.py) for float32;
- the compiled decode step (`use_compiled_decode`): one-query attention written out (infer/compiled.py).

Every implementation
computes what the plain one computes (tests/test_causal_blocks.py, test_documents.py, test_perf_paths.py,
test_model.py, test_int_gemv.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minimind.kernels import int_gemv
from minimind.kernels.attention import (
    causal_blocks_attention,
    inline_one_query_attention,
    one_query_kernel_attention,
    one_query_matmul_attention,
)
from minimind.kernels.documents import Documents
from minimind.kernels.moe import sorted_dispatch
from minimind.kernels.rmsnorm import hand_backward_rms_norm
from minimind.model.documents import document_mask
from minimind.model.layers import Attention, RMSNorm, eager_attention, rms_norm, sdpa_attention
from minimind.model.modeling_minimind import MiniMindModel
from minimind.model.moe import MoEFeedForward

ATTENTION_IMPLEMENTATIONS: dict[str, Callable] = {
    "sdpa": sdpa_attention,
    "eager": eager_attention,
    "causal_blocks": causal_blocks_attention,
    "one_query_matmul": one_query_matmul_attention,
    "one_query_inline": inline_one_query_attention,
    "one_query_kernel": one_query_kernel_attention,
}
DOCUMENT_IMPLEMENTATIONS: dict[str, Callable] = {"mask": document_mask, "documents": Documents}
NORM_IMPLEMENTATIONS: dict[str, Callable] = {"plain": rms_norm, "hand_backward": hand_backward_rms_norm}
# None: the plain model's own dispatch (boolean selection in training, sorted without gradients in inference)
MOE_IMPLEMENTATIONS: dict[str, Callable | None] = {"plain": None, "sorted": sorted_dispatch}


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Install attention implementation `name` on every MiniMind attention layer of `model` that uses SDPA (a
    model built with `flash_attn` off keeps its written-out attention)."""
    function = ATTENTION_IMPLEMENTATIONS[name]
    for module in model.modules():
        if isinstance(module, Attention) and module.attention_function is not eager_attention:
            module.attention_function = function


def set_document_attention(model: torch.nn.Module, name: str) -> None:
    """How the body of `model` turns packed rows' document ids into what attention takes."""
    for module in model.modules():
        if isinstance(module, MiniMindModel):
            module.document_attention = DOCUMENT_IMPLEMENTATIONS[name]


def set_norm(model: torch.nn.Module, name: str) -> None:
    """Install RMSNorm implementation `name` on every RMSNorm of `model`."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.norm_function = NORM_IMPLEMENTATIONS[name]


def set_moe_dispatch(model: torch.nn.Module, name: str) -> None:
    """Install MoE expert dispatch `name` on every MoE layer of `model` (nothing for a dense model)."""
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.dispatch_function = MOE_IMPLEMENTATIONS[name]


def use_training_kernels(model: torch.nn.Module, device: torch.device, compiled: bool = False) -> None:
    """What a training run selects once, before wrapping the model for its strategy: the RMSNorm backward and,
    unless the step is compiled, MoE dispatch sorted by expert; on a CPU also the causal GEMM blocks and, unless
    the step is compiled (torch.compile cannot trace the data-dependent document layout), per-document attention
    for packed rows. GPUs keep SDPA and the mask."""
    set_norm(model, "hand_backward")
    if not compiled:  # its per-expert row counts are data-dependent, as the document layout is
        set_moe_dispatch(model, "sorted")
    if device.type != "cpu":
        return
    set_attention(model, "causal_blocks")
    flash = not any(isinstance(m, Attention) and m.attention_function is eager_attention for m in model.modules())
    if flash and not compiled:
        set_document_attention(model, "documents")


def use_decode_kernels(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """What the Engine selects once for its model: on a CPU, one-query attention as two matmuls for eager
    bf16/fp16 decoding, and through the `one_query_attention` kernel for float32 where the row kernels are
    built (int_gemv.py); SDPA elsewhere. The compiled decode step installs its own (`use_compiled_decode`)."""
    if device.type == "cpu" and dtype != torch.float32:
        set_attention(model, "one_query_matmul")
    elif device.type == "cpu" and int_gemv.available():
        set_attention(model, "one_query_kernel")


def decode_key_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """How many cache columns the Engine's eager decode steps read, as a multiple (the mask hides the extra
    ones): 16 where `use_decode_kernels` chose the one-query matmuls (bf16/fp16 on a CPU), whose oneDNN matmuls
    keep memory for every shape they meet, so a width growing by one column a step would add a shape every step;
    1 elsewhere."""
    return 16 if device.type == "cpu" and dtype != torch.float32 else 1


def token_sampler(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                      tuple[torch.Tensor, torch.Tensor]] | None:
    """What the Engine draws unfiltered samples with, chosen once for its device: the one-pass `sample_tokens`
    kernel on a CPU where the kernels are built (int_gemv.py); None elsewhere (`sampling.choose_tokens`)."""
    return int_gemv.sample_tokens if device.type == "cpu" and int_gemv.available() else None


def use_compiled_decode(model: torch.nn.Module) -> None:
    """The attention of a compiled one-token step: `one_query` written out so it fuses into the step."""
    set_attention(model, "one_query_inline")
