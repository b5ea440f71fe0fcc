"""The module a training run optimises: the causal LM with its losses taken from the final hidden states.

`TrainingLM` holds a `MiniMindForCausalLM`'s body and output head under the same names (`model.*`, `lm_head.*`),
so its state dict, checkpoints and FSDP/DDP/ZeRO wrapping are the causal LM's. Its forward runs the body and a
chunked head loss (head_loss.py) that never keeps the (tokens x vocab) logits; the HF `forward` of the model
itself stays the standard one (`labels` -> mean loss, `logits`, `past_key_values`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from minimind.kernels.head_loss import head_cross_entropy
from minimind.model.modeling_minimind import MiniMindForCausalLM


class TrainingLM(nn.Module):
    """A causal LM with training losses from its hidden states; `lm` is the causal LM itself.

    Sampling during training (GRPO, PPO) calls this module, not `lm`: under FSDP the root's weights (embedding,
    final norm) are gathered by this module's forward, which passes every other call on to `lm`."""

    def __init__(self, lm: MiniMindForCausalLM):
        super().__init__()
        self.model = lm.model  # the same modules, registered under the causal LM's names
        self.lm_head = lm.lm_head
        self.__dict__["lm"] = lm  # not a submodule: its parameters are the two above
        self.config = lm.config

    def train(self, mode: bool = True) -> TrainingLM:
        super().train(mode)
        self.lm.training = mode  # the causal LM's own flag (its children are ours)
        return self

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        target_weights: torch.Tensor | None = None,
        per_row: bool = False,
        head_loss_fn: Callable[[torch.Tensor, nn.Module], object] | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """With `targets` (B, T), the next token of every position (already shifted): `loss` is
        Σ target_weights · (-log p(target)) (a sum, not a mean; weights default to 1; `per_row=True`: one sum per
        row, shape (B,)), and `logits` is None. With `head_loss_fn(hidden, lm_head)`: whatever it returns from the
        final hidden states (B, T, dim) and the head, run inside this forward (so DDP/FSDP see it as part of the
        model). With neither, the causal LM's own forward (logits, `labels`). `document_ids`: packed rows."""
        if targets is None and head_loss_fn is None:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               document_ids=document_ids, **kwargs)
        hidden, _, aux = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    inputs_embeds=kwargs.get("inputs_embeds"), use_cache=False,
                                    document_ids=document_ids)
        if head_loss_fn is not None:
            loss = head_loss_fn(hidden, self.lm_head)
        else:
            loss = head_cross_entropy(hidden, self.lm_head, targets, target_weights, per_row)
        return MoeCausalLMOutputWithPast(loss=loss, logits=None, aux_loss=aux)


def training_view(model: nn.Module) -> nn.Module:
    """`model` as a training objective calls it: a MiniMind causal LM inside a `TrainingLM`; anything else (a
    `TrainingLM`, a DDP/FSDP/compiled wrapper of one, a model with its own forward) as it is. Costs nothing:
    the view shares every module."""
    return TrainingLM(model) if isinstance(model, MiniMindForCausalLM) else model


def plain_model(model: nn.Module | None) -> nn.Module | None:
    """The causal LM inside a `TrainingLM` (what is saved as a model directory); anything else as it is."""
    return model.lm if isinstance(model, TrainingLM) else model
