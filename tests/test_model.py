"""The model against the reference users trust (HF Llama), its KV cache, padding, MoE and YaRN."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from minimind.info import count_parameters
from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.model.layers import rope_frequencies


def llama_twin(model: MiniMindForCausalLM) -> LlamaForCausalLM:
    """An HF Llama of the same shapes holding the same weights (our parameter names are Llama's)."""
    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    llama = LlamaForCausalLM(config).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    llama.tie_weights()
    return llama


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights larger than the init's so that the comparison exercises every term, norms included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


def test_preset_parameter_counts_match_spec_and_built_model():
    expected = {"small": 25_829_888, "base": 104_030_976, "moe": 145_029_760}  # 25.83M, 104.03M, 145.03M
    for name, exact in expected.items():
        assert count_parameters(MiniMindConfig.from_preset(name)).total == exact
    for name in ("tiny", "small", "base", "moe"):
        config = MiniMindConfig.from_preset(name)
        with torch.device("meta"):
            built = sum(p.numel() for p in MiniMindForCausalLM(config).parameters())
        assert built == count_parameters(config).total, name


def test_moe_active_parameters_count_only_chosen_experts():
    config = MiniMindConfig.from_preset("moe")
    counts = count_parameters(config)
    expert = 3 * config.dim * config.hidden_dim
    assert counts.total - counts.active == config.n_layers * (config.n_routed_experts - 2) * expert


def test_ffn_width_follows_seed_formula():
    assert [MiniMindConfig(dim=d).hidden_dim for d in (512, 768, 640)] == [1408, 2048, 1728]


@pytest.mark.parametrize("flash", [True, False])
def test_logits_equal_hf_llama(flash):
    model = tiny_model(flash_attn=flash, n_kv_heads=2)
    randomize(model)
    llama = llama_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 37))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_labels_give_shifted_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual)


def greedy(model, ids: torch.Tensor, steps: int, attention_mask=None, use_cache: bool = True) -> torch.Tensor:
    """Plain greedy decoding: with the cache, one new token per forward; without, the whole prefix each time."""
    out, cache = ids, None
    mask = attention_mask
    step_input = ids
    for _ in range(steps):
        with torch.no_grad():
            if use_cache:
                res = model(step_input, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = res.past_key_values
            else:
                res = model(out, attention_mask=mask, use_cache=False)
        nxt = res.logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        step_input = nxt
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return out


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_greedy_equals_recompute(use_moe):
    model = tiny_model(use_moe=use_moe)
    randomize(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    assert torch.equal(greedy(model, ids, 20, use_cache=True), greedy(model, ids, 20, use_cache=False))


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model()
    randomize(model)
    torch.manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,)) for n in (4, 11, 7)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    together = greedy(model, batch, 15, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = greedy(model, p[None], 15)
        assert torch.equal(together[i, width:], alone[0, len(p):]), f"prompt {i}"


def test_hf_generate_uses_our_cache_and_padding():
    model = tiny_model()
    randomize(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    ours = greedy(model, ids, 12)
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_moe_aux_loss_positive_with_gradients_and_token_level_too():
    for seq_aux in (True, False):
        model = tiny_model(use_moe=True, seq_aux=seq_aux).train()
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        out = model(ids)
        assert out.aux_loss.item() > 0
        out.aux_loss.backward()
        gate_grad = model.model.layers[0].mlp.gate.weight.grad
        assert gate_grad is not None and gate_grad.abs().sum() > 0


def test_moe_grouped_inference_matches_training_dispatch():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    randomize(model)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 10, model.config.dim)
    with torch.no_grad():
        ids, weights, _ = moe.gate(x)
        flat = x.reshape(-1, x.shape[-1])
        torch.testing.assert_close(
            moe.dispatch_grouped(flat, ids, weights), moe.dispatch_masked(flat, ids, weights), atol=1e-6, rtol=1e-6
        )
        # and through the whole model: train-mode forward (dropout 0) equals eval-mode forward
        ids_in = torch.randint(0, model.config.vocab_size, (2, 12))
        eval_logits = model(ids_in).logits
        train_logits = model.train()(ids_in).logits
    torch.testing.assert_close(eval_logits, train_logits, atol=1e-5, rtol=1e-5)


def test_yarn_frequencies_match_hf_yarn():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_config(max_seq_len=128).with_yarn(4.0)
    assert config.max_seq_len == 512 and config.yarn_original_max_seq_len == 128
    llama = LlamaConfig(
        hidden_size=config.dim, num_attention_heads=config.n_heads, max_position_embeddings=config.max_seq_len,
        rope_parameters={"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": 4.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0},
    )
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](llama, "cpu")
    ours, our_scale = rope_frequencies(config)
    torch.testing.assert_close(ours, theirs)
    assert our_scale == pytest.approx(their_scale)


def test_yarn_model_runs_past_trained_length_and_keeps_every_position_causal():
    """Past the trained length the YaRN model's logits are finite, position-dependent, and each position's
    logits are those of the prefix alone. (That they equal LlamaForCausalLM with YaRN rope scaling, within and
    past the trained window, is tests/test_convert_llama.py::test_yarn_model_matches_beyond_its_trained_length.)"""
    model = tiny_model(max_seq_len=32)
    randomize(model)
    long_model = MiniMindForCausalLM(model.config.with_yarn(4.0)).eval()
    long_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 100))
    with torch.no_grad():
        logits = long_model(ids).logits
        for length in (16, 32, 64):
            torch.testing.assert_close(long_model(ids[:, :length]).logits, logits[:, :length])
        plain = model(ids[:, :16]).logits
    assert logits.shape == (1, 100, 512) and torch.isfinite(logits).all()
    assert logits[0, 32:].argmax(-1).unique().numel() > 1  # past the window: not one stuck answer
    assert (logits[:, :16] - plain).abs().max() > 0.1  # YaRN changes the low frequencies even inside the window


def test_config_errors_are_one_clear_sentence():
    with pytest.raises(ValueError, match="'n_heads' \\(6\\) must divide 'dim' \\(64\\)"):
        tiny_config(n_heads=6)
    with pytest.raises(ValueError, match="'n_kv_heads' \\(3\\) must divide 'n_heads' \\(4\\)"):
        tiny_config(n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        MiniMindConfig.from_preset("huge")


def test_hf_aliases_read_and_write_seed_fields():
    config = tiny_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.max_position_embeddings, config.intermediate_size) == (2, 256, 192)
    assert MiniMindConfig(hidden_size=128, num_hidden_layers=3).dim == 128


def test_tied_head_and_dropout_in_training_only():
    model = tiny_model(dropout=0.5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_hf_alias_arguments_drive_derived_fields():
    config = MiniMindConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert config.dim == 128 and config.hidden_dim == 384 and config.head_dim == 32


def test_rms_norm_training_backward_equals_autograd_of_the_formula():
    """Training (float32, grad on) with the kernel the trainer installs runs the hand-written backward: values and
    both gradients equal autograd's through the plain formula; gradcheck in float64 on the function itself."""
    from minimind.kernels import set_norm
    from minimind.kernels.rmsnorm import _RMSNormFunction
    from minimind.model.layers import RMSNorm

    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=generator))
    assert norm(torch.ones(1, 48, requires_grad=True)).grad_fn.name() != "_RMSNormFunctionBackward"  # plain model
    set_norm(norm, "hand_backward")
    x = torch.randn(3, 5, 48, generator=generator).requires_grad_()
    grad = torch.randn(3, 5, 48, generator=generator)
    out = norm(x)
    assert out.grad_fn.name() == "_RMSNormFunctionBackward"
    out.backward(grad)
    x2 = x.detach().clone().requires_grad_()
    weight = norm.weight.detach().clone().requires_grad_()
    expected = weight * (x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6))
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference keeps the plain formula
        torch.testing.assert_close(norm(x), expected.detach(), rtol=1e-6, atol=1e-6)
    inputs = (torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True),
              torch.randn(8, dtype=torch.float64, requires_grad=True), 1e-5)
    assert torch.autograd.gradcheck(_RMSNormFunction.apply, inputs)
