"""MiniMind2 `.pth` import/export: bit-exact round trips, and logits equal to MiniMind2's own formula.

The reference forward below is written from MiniMind2's published architecture: RMSNorm, RoPE as
complex rotation of interleaved pairs (`precompute_pos_cis` + `view_as_complex`), GQA with `repeat_kv`,
SwiGLU `w2(silu(w1 x) * w3 x)`, softmax top-k MoE with shared experts, output tied to the embedding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from convert_helpers import random_ids

from minimind.convert.minimind2 import export_minimind2, import_minimind2, load_pth
from minimind.errors import UserError
from minimind.modeldir import load_model, load_model_dir

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, hidden=192)


def minimind2_state(
    seed=0, experts=0, top_k=2, shared=1, single_shared=True, dtype=torch.float32, std=0.2, **shape
):
    """A random state dict in MiniMind2's layout; `experts` > 0 makes every layer MoE."""
    s = {**SHAPE, **shape}
    dim, hd = s["dim"], s["dim"] // s["n_heads"]
    g = torch.Generator().manual_seed(seed)

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=g) * std).to(dtype)

    def swiglu(prefix):
        return {
            f"{prefix}.w1.weight": mat(s["hidden"], dim),
            f"{prefix}.w2.weight": mat(dim, s["hidden"]),
            f"{prefix}.w3.weight": mat(s["hidden"], dim),
        }

    embed = mat(s["vocab"], dim)
    state = {"tok_embeddings.weight": embed}
    for i in range(s["n_layers"]):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": mat(dim, dim),
            p + "attention.wk.weight": mat(s["n_kv_heads"] * hd, dim),
            p + "attention.wv.weight": mat(s["n_kv_heads"] * hd, dim),
            p + "attention.wo.weight": mat(dim, dim),
            p + "attention_norm.weight": (1 + torch.randn(dim, generator=g) * 0.2).to(dtype),
            p + "ffn_norm.weight": (1 + torch.randn(dim, generator=g) * 0.2).to(dtype),
        }
        if experts:
            state[p + "feed_forward.gate.weight"] = mat(experts, dim)
            for e in range(experts):
                state |= swiglu(f"{p}feed_forward.experts.{e}")
            if single_shared and shared == 1:
                state |= swiglu(f"{p}feed_forward.shared_experts")
            for j in range(shared if not single_shared else 0):
                state |= swiglu(f"{p}feed_forward.shared_experts.{j}")
        else:
            state |= swiglu(f"{p}feed_forward")
    state["norm.weight"] = (1 + torch.randn(dim, generator=g) * 0.2).to(dtype)
    state["output.weight"] = embed  # tied, as MiniMind2's state_dict() returns it
    return state


def reference_logits(state, ids, n_heads, top_k=2, eps=1e-5, theta=1e6):
    """MiniMind2's forward pass, computed straight from its weights and its interleaved complex RoPE."""
    emb = state["tok_embeddings.weight"].float()
    dim = emb.shape[1]
    hd = dim // n_heads
    b, t = ids.shape
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    pos_cis = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))  # (T, hd/2)

    def rope(x):  # (B, T, H, hd): rotate pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def w(key):
        return state[key].float()

    def swiglu(prefix, x):
        return (
            F.silu(x @ w(prefix + ".w1.weight").T)
            * (x @ w(prefix + ".w3.weight").T)
            @ w(prefix + ".w2.weight").T
        )

    h = emb[ids]
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))):
        p = f"layers.{i}."
        x = rms(h, w(p + "attention_norm.weight"))
        q = rope((x @ w(p + "attention.wq.weight").T).view(b, t, n_heads, hd))
        k = (x @ w(p + "attention.wk.weight").T).view(b, t, -1, hd)
        v = (x @ w(p + "attention.wv.weight").T).view(b, t, -1, hd)
        n_rep = n_heads // k.shape[2]
        k, v = rope(k).repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)  # repeat_kv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd) + causal
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, dim)
        h = h + attn @ w(p + "attention.wo.weight").T
        x = rms(h, w(p + "ffn_norm.weight"))
        if p + "feed_forward.gate.weight" in state:
            probs = (x @ w(p + "feed_forward.gate.weight").T).softmax(-1)  # (B, T, E)
            top_w, top_i = probs.topk(top_k, dim=-1)
            if top_k > 1:
                top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
            weights = torch.zeros_like(probs).scatter(-1, top_i, top_w)
            y = sum(
                weights[..., e, None] * swiglu(f"{p}feed_forward.experts.{e}", x)
                for e in range(probs.shape[-1])
            )
            shared = sorted(
                {k.rsplit(".", 2)[0] for k in state if k.startswith(p + "feed_forward.shared_experts")}
            )
            y = y + sum(swiglu(prefix, x) for prefix in shared)
        else:
            y = swiglu(p + "feed_forward", x)
        h = h + y
    return rms(h, w("norm.weight")) @ w("output.weight").T


def save_pth(state, path):
    torch.save(state, path)
    return path


def assert_identical(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(experts=4),
        dict(experts=4, shared=2, single_shared=False),
        dict(experts=3, shared=0, top_k=1),
        dict(dtype=torch.float16),
    ],
    ids=["dense", "moe", "moe-2-shared", "moe-no-shared-top1", "dense-fp16"],
)
def test_import_then_export_round_trips_bit_exactly(tmp_path, tokenizer_dir, variant):
    state = minimind2_state(**variant)
    import_minimind2(
        save_pth(state, tmp_path / "in.pth"),
        tokenizer_dir,
        tmp_path / "model",
        n_heads=4,
        experts_per_tok=variant.get("top_k"),
    )
    back = torch.load(export_minimind2(tmp_path / "model", tmp_path / "out.pth"), weights_only=True)
    assert_identical(state, back)


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(experts=4), dict(experts=4, shared=2, single_shared=False)],
    ids=["dense", "moe", "moe-2-shared"],
)
def test_imported_logits_equal_minimind2_reference_forward(tmp_path, tokenizer_dir, variant):
    state = minimind2_state(seed=1, **variant)
    config = import_minimind2(
        save_pth(state, tmp_path / "in.pth"), tokenizer_dir, tmp_path / "model", n_heads=4
    )
    assert config.use_moe == bool(variant) and config.n_kv_heads == 2 and config.hidden_dim == 192
    ids = random_ids(2, 16)
    with torch.no_grad():
        ours = load_model(tmp_path / "model")(ids).logits
    torch.testing.assert_close(ours, reference_logits(state, ids, n_heads=4), atol=1e-5, rtol=1e-5)


def test_reference_forward_is_sensitive_to_the_rope_layout(tmp_path, tokenizer_dir):
    """Guard against a vacuous check: importing *without* the permutation gives different logits."""
    from minimind.convert import minimind2

    state = minimind2_state(seed=2)
    config = import_minimind2(
        save_pth(state, tmp_path / "in.pth"), tokenizer_dir, tmp_path / "model", n_heads=4
    )
    model = load_model(tmp_path / "model")
    unpermuted = {k: v for k, v in minimind2.to_our_state(state, config, "x").items()}
    for i in range(config.n_layers):
        for name, legacy in (("q_proj", "wq"), ("k_proj", "wk")):
            unpermuted[f"model.layers.{i}.self_attn.{name}.weight"] = state[
                f"layers.{i}.attention.{legacy}.weight"
            ]
    model.load_state_dict(unpermuted, strict=False)
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert (model(ids).logits - reference_logits(state, ids, n_heads=4)).abs().max() > 1e-2


def test_head_count_comes_from_the_preset_matching_the_width(tmp_path, tokenizer_dir):
    state = minimind2_state(dim=512, n_heads=8, n_layers=1, hidden=1408, std=0.05)
    pth = save_pth(state, tmp_path / "small.pth")
    config = import_minimind2(pth, tokenizer_dir, tmp_path / "model")  # width 512 -> preset small
    assert (config.n_heads, config.n_kv_heads, config.n_layers) == (8, 2, 1)
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "model")(ids).logits, reference_logits(state, ids, 8), atol=1e-5, rtol=1e-5
        )
    with pytest.raises(UserError, match="--preset base has dim 768 but tok_embeddings.weight has width 512"):
        import_minimind2(pth, tokenizer_dir, tmp_path / "other", preset="base")
    with pytest.raises(UserError, match="matches no preset.*--n-heads"):
        import_minimind2(save_pth(minimind2_state(), tmp_path / "tiny.pth"), tokenizer_dir, tmp_path / "t")


def test_hf_named_minimind_checkpoints_import_without_permutation(tmp_path, tokenizer_dir):
    """Later reference releases save HF-style names with rotate-half RoPE: our own layout."""
    from conftest import tiny_model
    from convert_helpers import randomize

    model = randomize(tiny_model(use_moe=True))
    import_minimind2(
        save_pth(model.state_dict(), tmp_path / "hf.pth"), tokenizer_dir, tmp_path / "model", n_heads=4
    )
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "model")(ids).logits, model(ids).logits)


def reference_hf_dir(path, model, tokenizer_dir, **config_fields):
    """A directory as the reference project's transformers format saves it: its config.json field names, HF-style
    weight names, the output head left out (tied), and the tokenizer files."""
    import json
    import shutil

    from safetensors.torch import save_file

    c = model.config
    path.mkdir()
    config = {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": c.dim,
              "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
              "intermediate_size": c.hidden_dim, "vocab_size": c.vocab_size, "rope_theta": c.rope_theta,
              "rms_norm_eps": c.norm_eps, "max_position_embeddings": 32768, "hidden_act": "silu", "dropout": 0.0,
              "flash_attn": True, "use_moe": c.use_moe, "num_experts_per_tok": c.num_experts_per_tok,
              "n_routed_experts": c.n_routed_experts, "n_shared_experts": c.n_shared_experts,
              "inference_rope_scaling": False, **config_fields}
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.mark.parametrize("moe", [False, True])
def test_reference_transformers_directories_import_with_their_config(tmp_path, tokenizer_dir, moe):
    """No --tokenizer and no head count needed: config.json gives the heads (no preset has the test width),
    the experts per token, rope_theta and the norm epsilon; the tokenizer comes from the directory."""
    from conftest import tiny_model
    from convert_helpers import randomize

    from minimind.cli import main

    model = randomize(tiny_model(n_heads=4, n_kv_heads=2, rope_theta=5e4, norm_eps=1e-6, use_moe=moe,
                                 num_experts_per_tok=1))
    source = reference_hf_dir(tmp_path / "MiniMind2-HF", model, tokenizer_dir)
    assert main(["convert", str(source), "--from", "minimind2", "--out", str(tmp_path / "model")]) == 0
    imported, tokenizer = load_model_dir(tmp_path / "model")
    c = imported.config
    assert (c.n_heads, c.rope_theta, c.norm_eps, c.max_seq_len, c.use_moe) == (4, 5e4, 1e-6, 32768, moe)
    assert not moe or c.num_experts_per_tok == 1
    assert len(tokenizer) == model.config.vocab_size
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(imported(ids).logits, model(ids).logits)

    with pytest.raises(UserError, match="model_type is 'llama', expected 'minimind'"):
        import_minimind2(reference_hf_dir(tmp_path / "llama", model, tokenizer_dir, model_type="llama"), None,
                         tmp_path / "never")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: a directory without config.json"):
        import_minimind2(tmp_path / "empty", None, tmp_path / "never")
    (source / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin beside config.json"):
        import_minimind2(source, None, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_wrapped_and_prefixed_state_dicts_load(tmp_path):
    state = minimind2_state()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert_identical(load_pth(tmp_path / "ckpt.pth"), state)


def test_bad_checkpoints_fail_naming_the_key(tmp_path, tokenizer_dir):
    def attempt(state, **kwargs):
        path = tmp_path / "bad.pth"
        torch.save(state, path)
        import_minimind2(path, tokenizer_dir, tmp_path / "never", **{"n_heads": 4, **kwargs})

    state = minimind2_state()
    with pytest.raises(UserError, match="missing key 'layers.1.attention.wk.weight'"):
        attempt({k: v for k, v in state.items() if k != "layers.1.attention.wk.weight"})
    with pytest.raises(UserError, match="unexpected key 'layers.0.attention.wq.bias'"):
        attempt({**state, "layers.0.attention.wq.bias": torch.zeros(64)})
    with pytest.raises(
        UserError, match=r"key 'layers.1.feed_forward.w3.weight' has shape \(100, 64\), expected \(192, 64\)"
    ):
        attempt({**state, "layers.1.feed_forward.w3.weight": torch.zeros(100, 64)})
    with pytest.raises(UserError, match="'output.weight' differs from 'tok_embeddings.weight'"):
        attempt({**state, "output.weight": torch.zeros(512, 64)})
    with pytest.raises(UserError, match="--n-heads 3 does not divide the model width 64"):
        attempt(state, n_heads=3)
    with pytest.raises(UserError, match="missing key 'tok_embeddings.weight'"):
        attempt({k: v for k, v in state.items() if k != "tok_embeddings.weight"})
    with pytest.raises(
        UserError, match=r"not a state dict \(expected a non-empty dict of tensors, got list\)"
    ):
        attempt([1, 2, 3])
    with pytest.raises(UserError, match="key 'step' holds a int, not a tensor"):
        attempt({**state, "step": 7})
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="text.pth: not a PyTorch state dict loadable with weights_only=True"):
        import_minimind2(tmp_path / "text.pth", tokenizer_dir, tmp_path / "never", n_heads=4)
    with pytest.raises(UserError, match="no such file"):
        import_minimind2(tmp_path / "absent.pth", tokenizer_dir, tmp_path / "never", n_heads=4)
    assert not (tmp_path / "never").exists()


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tokenizer_dir):
    path = save_pth(minimind2_state(vocab=300), tmp_path / "small-vocab.pth")
    with pytest.raises(
        UserError, match="the tokenizer has 512 tokens but the checkpoint's embedding has 300 rows"
    ):
        import_minimind2(path, tokenizer_dir, tmp_path / "model", n_heads=4)


def test_import_with_a_minimind2_style_tokenizer(tmp_path, minimind2_tokenizer_dir):
    """A tokenizer like MiniMind2's (6400 tokens, its own chat template): the template is kept, logits match."""
    state = minimind2_state(vocab=6400, experts=4)
    import_minimind2(save_pth(state, tmp_path / "in.pth"), minimind2_tokenizer_dir, tmp_path / "model", n_heads=4)
    model, tokenizer = load_model_dir(tmp_path / "model")
    assert len(tokenizer) == 6400 and "你是 MiniMind" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(state, ids, 4), atol=1e-5, rtol=1e-5)


def test_an_moe_whose_routed_and_shared_widths_differ_is_refused_on_export(tmp_path, tokenizer):
    from conftest import tiny_model

    from minimind.modeldir import save_model_dir

    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, hidden_dim=128,
                       moe_intermediate_size=64)
    save_model_dir(model, tokenizer, tmp_path / "moe")
    with pytest.raises(UserError, match="routed experts are 64 wide and the shared ones 128"):
        export_minimind2(tmp_path / "moe", tmp_path / "moe.pth")
    assert not (tmp_path / "moe.pth").exists()
