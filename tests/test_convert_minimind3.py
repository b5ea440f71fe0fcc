"""minimind-3 and Qwen3 in and out: released minimind-3 directories and `.pth` files, Qwen3 / Qwen3-MoE
directories, compared with transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM on the same weights.

The released-directory fixture is written by hand as minimind-3 publishes it: config.json in its field names
(model_type "minimind", hidden_size, head_dim, num_experts, moe_intermediate_size, ...), weights with Qwen3's
names (q_norm/k_norm, per-expert `mlp.experts.{e}.*`, router `mlp.gate`), and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from convert_helpers import random_ids, random_model_dir, run_cli
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig

from minimind.cli import main
from minimind.convert.minimind3 import export_minimind3, import_minimind3, import_qwen3
from minimind.convert.qwen3 import export_qwen3
from minimind.modeldir import load_model, load_model_dir

# head_dim 24 with 4 heads is not dim / n_heads (64 / 4): it must come from q_norm, as minimind-3's and Qwen3's can
SHAPE = dict(vocab=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden=96, experts=0, moe_hidden=48)


def qwen3_state(seed: int = 0, dtype=torch.float32, **shape) -> dict[str, torch.Tensor]:
    """Random weights under Qwen3's names (no lm_head: tied); `experts` > 0 makes every layer MoE."""
    s = {**SHAPE, **shape}
    g = torch.Generator().manual_seed(seed)

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=g) * 0.2).to(dtype)

    def norm(size):  # around 1, so a dropped or misplaced norm shows in the logits
        return (1 + torch.randn(size, generator=g) * 0.2).to(dtype)

    def swiglu(prefix, width):
        return {f"{prefix}.gate_proj.weight": mat(width, s["dim"]), f"{prefix}.up_proj.weight": mat(width, s["dim"]),
                f"{prefix}.down_proj.weight": mat(s["dim"], width)}

    q, kv = s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    state = {"model.embed_tokens.weight": mat(s["vocab"], s["dim"]), "model.norm.weight": norm(s["dim"])}
    for i in range(s["n_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": norm(s["dim"]), p + "post_attention_layernorm.weight": norm(s["dim"]),
            p + "self_attn.q_proj.weight": mat(q, s["dim"]), p + "self_attn.k_proj.weight": mat(kv, s["dim"]),
            p + "self_attn.v_proj.weight": mat(kv, s["dim"]), p + "self_attn.o_proj.weight": mat(s["dim"], q),
            p + "self_attn.q_norm.weight": norm(s["head_dim"]), p + "self_attn.k_norm.weight": norm(s["head_dim"]),
        }
        if s["experts"]:
            state[p + "mlp.gate.weight"] = mat(s["experts"], s["dim"])
            for e in range(s["experts"]):
                state |= swiglu(f"{p}mlp.experts.{e}", s["moe_hidden"])
        else:
            state |= swiglu(p + "mlp", s["hidden"])
    return state


def hf_fields(top_k: int = 1, **shape) -> dict:
    """config.json fields shared by minimind-3's and Qwen3's formats (they use the same names)."""
    s = {**SHAPE, **shape}
    fields = {"vocab_size": s["vocab"], "hidden_size": s["dim"], "intermediate_size": s["hidden"],
              "num_hidden_layers": s["n_layers"], "num_attention_heads": s["n_heads"],
              "num_key_value_heads": s["n_kv_heads"], "head_dim": s["head_dim"], "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2}
    if s["experts"]:
        fields |= {"num_experts": s["experts"], "num_experts_per_tok": top_k, "moe_intermediate_size": s["moe_hidden"],
                   "norm_topk_prob": True, "router_aux_loss_coef": 5e-4}
    return fields


def released_dir(path, state, tokenizer_dir, weights="model.safetensors", top_k=1, **overrides):
    """A directory as minimind-3 releases it: its config.json fields, Qwen3-named weights, the tokenizer."""
    moe = "model.layers.0.mlp.gate.weight" in state
    experts = state["model.layers.0.mlp.gate.weight"].shape[0] if moe else 0
    config = {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "dropout": 0.0, "flash_attn": True,
              "use_moe": moe, "inference_rope_scaling": False, "rope_scaling": None,
              **hf_fields(top_k, experts=experts), **overrides}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if weights == "model.safetensors":
        save_file(state, str(path / weights))
    else:  # their convert script's save_pretrained(safe_serialization=False): the tied head saved too
        torch.save({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, path / weights)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def transformers_qwen3(state, path, top_k=1):
    """transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM holding `state` (per-expert names, read through
    from_pretrained as a released Qwen3 checkpoint is)."""
    experts = state["model.layers.0.mlp.gate.weight"].shape[0] if "model.layers.0.mlp.gate.weight" in state else 0
    fields = hf_fields(top_k, experts=experts)
    (Qwen3MoeConfig if experts else Qwen3Config)(**fields).save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_same_logits(ours, theirs, ids):
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.abs().max() > 1  # not two near-zero tensors
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def tiny_qk_norm_dir(path, tokenizer, moe=False, **overrides):
    """A model directory of ours with minimind-3's architecture (QK-norm; MoE without shared experts)."""
    fields = dict(qk_norm=True, head_dim=24, hidden_dim=96, norm_eps=1e-6)
    if moe:
        fields |= dict(use_moe=True, n_routed_experts=3, num_experts_per_tok=1, n_shared_experts=0,
                       moe_intermediate_size=48)
    return random_model_dir(path, tokenizer, **{**fields, **overrides})


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(weights="pytorch_model.bin"), dict(experts=3), dict(experts=4, top_k=2)],
    ids=["dense", "dense-bin", "moe-top1", "moe-top2"],
)
def test_released_directory_imports_with_transformers_qwen3_logits(tmp_path, tokenizer_dir, variant):
    weights, top_k = variant.pop("weights", "model.safetensors"), variant.pop("top_k", 1)
    state = qwen3_state(**variant)
    source = released_dir(tmp_path / "minimind-3", state, tokenizer_dir, weights, top_k)
    assert main(["convert", str(source), "--from", "minimind3", "--out", str(tmp_path / "model")]) == 0
    model, tokenizer = load_model_dir(tmp_path / "model")
    c = model.config
    assert (c.qk_norm, c.head_dim, c.n_heads, c.n_kv_heads, c.norm_eps, c.max_seq_len) == (True, 24, 4, 2, 1e-6, 4096)
    assert c.use_moe == bool(variant) and (not c.use_moe or (c.num_experts_per_tok, c.n_shared_experts) == (top_k, 0))
    assert len(tokenizer) == 512 and (tmp_path / "model" / "tokenizer_config.json").is_file()
    assert_same_logits(model, transformers_qwen3(state, tmp_path / "qwen3", top_k), random_ids(2, 16))


def test_yarn_directory_imports_with_its_attention_factor_and_exports_it(tmp_path, tokenizer_dir):
    """minimind-3's inference YaRN (factor 16 over 2048 positions, β 32/1) scales cos/sin by attention_factor 1.0,
    not YaRN's default 0.1·ln(16)+1; the import keeps it, and --to qwen3 writes it."""
    yarn = {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
            "attention_factor": 1.0, "type": "yarn"}
    state = qwen3_state(seed=3)
    source = released_dir(tmp_path / "src", state, tokenizer_dir, inference_rope_scaling=True, rope_scaling=yarn,
                          max_position_embeddings=32768)
    config = import_minimind3(source, None, tmp_path / "model")
    assert (config.yarn_factor, config.yarn_original_max_seq_len, config.yarn_attention_factor) == (16.0, 2048, 1.0)
    ours = load_model(tmp_path / "model")
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 2048,
            "beta_fast": 32.0, "beta_slow": 1.0}
    theirs = Qwen3ForCausalLM(Qwen3Config(**{**hf_fields(), "max_position_embeddings": 32768,
                                             "rope_parameters": {**rope, "attention_factor": 1.0}})).eval()
    theirs.load_state_dict(state, strict=False)
    theirs.tie_weights()
    ids = random_ids(2, 40)
    assert_same_logits(ours, theirs, ids)
    default_scale = Qwen3ForCausalLM(Qwen3Config(**{**hf_fields(), "max_position_embeddings": 32768,
                                                    "rope_parameters": rope})).eval()
    default_scale.load_state_dict(state, strict=False)
    default_scale.tie_weights()
    with torch.no_grad():  # the attention factor matters: the default one gives other logits
        assert (ours(ids).logits - default_scale(ids).logits).abs().max() > 1e-2
    export_qwen3(tmp_path / "model", tmp_path / "qwen3")
    written = json.loads((tmp_path / "qwen3" / "config.json").read_text())
    assert written["rope_parameters"]["attention_factor"] == written["rope_scaling"]["attention_factor"] == 1.0
    assert_same_logits(ours, AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3").eval(), ids)


def test_pth_import_takes_every_shape_from_the_tensors_and_exports_back_bit_exactly(tmp_path, tokenizer_dir):
    """fp16 under 'model' as a training checkpoint nests it, lm_head included as their state_dict() has it."""
    state = qwen3_state(dtype=torch.float16, experts=3)
    torch.save({"model": {**state, "lm_head.weight": state["model.embed_tokens.weight"]}, "step": torch.tensor(3)},
               tmp_path / "full_sft_64_moe.pth")
    config = import_minimind3(tmp_path / "full_sft_64_moe.pth", tokenizer_dir, tmp_path / "model")
    assert (config.head_dim, config.n_heads, config.n_kv_heads, config.n_layers) == (24, 4, 2, 2)
    assert (config.n_routed_experts, config.moe_intermediate_size, config.num_experts_per_tok) == (3, 48, 1)
    assert (config.rope_theta, config.norm_eps, config.max_seq_len, config.vocab_size) == (1e6, 1e-6, 32768, 512)
    export_minimind3(tmp_path / "model", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(state) | {"lm_head.weight"}
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], state[k]) for k in state)
    assert torch.equal(back["lm_head.weight"], state["model.embed_tokens.weight"])
    model = load_model(tmp_path / "model").float()
    assert_same_logits(model, transformers_qwen3({k: v.float() for k, v in state.items()}, tmp_path / "q"),
                       random_ids())


@pytest.mark.slow
def test_experts_per_token_flag_overrides_the_default_top1(tmp_path, tokenizer_dir):
    torch.save(qwen3_state(experts=4), tmp_path / "moe.pth")
    result = run_cli("convert", tmp_path / "moe.pth", "--from", "minimind3", "--tokenizer", tokenizer_dir,
                     "--experts-per-tok", "2", "--out", tmp_path / "model")
    assert result.returncode == 0, result.stderr
    assert "imported minimind-3 weights (dim 64, 2 layers, MoE 4+0 experts)" in result.stdout
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_experts_per_tok"] == 2


@pytest.mark.parametrize(
    "moe, overrides",
    [(False, {}), (True, {}), (True, dict(norm_top1_prob=False))],
    ids=["dense", "moe", "moe-top1-router-probability"],  # the last: the expert's weight is its raw probability
)
def test_to_qwen3_loads_without_remote_code_with_equal_logits_and_imports_back(
    tmp_path, tokenizer, moe, overrides, capsys
):
    source = tiny_qk_norm_dir(tmp_path / "src", tokenizer, moe=moe, **overrides)
    architecture = "Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"
    assert main(["convert", str(source), "--to", "qwen3", "--out", str(tmp_path / "qwen3")]) == 0
    assert f"wrote a {architecture} directory" in capsys.readouterr().out
    assert not list((tmp_path / "qwen3").glob("*.py"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3").eval()  # no trust_remote_code on purpose
    assert type(theirs).__name__ == architecture
    ours = load_model(source)
    assert_same_logits(ours, theirs, random_ids(3, 20))
    prompt = random_ids(1, 5, seed=2)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), theirs.generate(prompt, **kwargs))

    import_qwen3(tmp_path / "qwen3", None, tmp_path / "back")
    back = load_model(tmp_path / "back")
    fields = ("qk_norm", "head_dim", "norm_eps", "use_moe", "num_experts_per_tok", "moe_intermediate_size")
    assert [getattr(back.config, f) for f in fields] == [getattr(ours.config, f) for f in fields]
    assert back.config.renormalises_top_k() == ours.config.renormalises_top_k()
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_directory_transformers_saved_itself_imports(tmp_path, tokenizer_dir):
    """transformers 5 writes num_local_experts and rope_parameters instead of num_experts and rope_theta."""
    state = qwen3_state(experts=3)
    theirs = transformers_qwen3(state, tmp_path / "made")
    theirs.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "num_local_experts" in config and "rope_theta" not in config
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / "saved" / name)
    imported = import_qwen3(tmp_path / "saved", None, tmp_path / "model")
    assert (imported.n_routed_experts, imported.rope_theta, imported.norm_top1_prob) == (3, 1e6, True)
    assert_same_logits(load_model(tmp_path / "model"), theirs, random_ids())


def test_a_transformers_5_state_dict_with_fused_experts_imports(tmp_path, tokenizer_dir):
    state = qwen3_state(experts=3)
    theirs = transformers_qwen3(state, tmp_path / "made")
    fused = theirs.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    torch.save(fused, tmp_path / "fused.pth")
    import_minimind3(tmp_path / "fused.pth", tokenizer_dir, tmp_path / "model")
    assert_same_logits(load_model(tmp_path / "model"), theirs, random_ids())


def test_chat_template_saved_beside_the_tokenizer_is_kept(tmp_path, tokenizer_dir):
    """transformers 5's save_pretrained puts the template in chat_template.jinja; the model directory keeps it in
    tokenizer_config.json, which every export copies."""
    source = released_dir(tmp_path / "src", qwen3_state(), tokenizer_dir)
    config = json.loads((source / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    (source / "chat_template.jinja").write_text(template)
    (source / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    import_minimind3(source, None, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["chat_template"] == template
    _, tokenizer = load_model_dir(tmp_path / "model")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>hi"


def test_models_without_a_qwen3_form_point_to_the_format_that_holds_them(tmp_path, tokenizer, capsys):
    plain = str(random_model_dir(tmp_path / "plain", tokenizer))
    shared = str(tiny_qk_norm_dir(tmp_path / "shared", tokenizer, moe=True, n_shared_experts=1))
    qk_norm = str(tiny_qk_norm_dir(tmp_path / "qk", tokenizer))
    capsys.readouterr()
    cases = [
        ([plain, "--to", "qwen3"], "config field 'qk_norm' is false: --to qwen3 holds QK-norm models only; use --to llama"),
        ([plain, "--to", "minimind3"], "--to minimind3 holds QK-norm models only"),
        ([shared, "--to", "qwen3"], "config field 'n_shared_experts' is 1: --to qwen3 holds routed experts only"),
        ([qk_norm, "--to", "llama"], "config field 'qk_norm' is true; Llama and Qwen2-MoE have no QK-norm, use --to qwen3"),
        ([qk_norm, "--to", "minimind2"], "config field 'qk_norm' is true (a minimind-3 model)"),
    ]
    for flags, message in cases:
        out = tmp_path / "out"
        assert main(["convert", *flags, "--out", str(out)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    from test_convert_minimind2 import minimind2_state, reference_hf_dir

    state, tok = qwen3_state(), str(tokenizer_dir)
    dense = released_dir(tmp_path / "m3", state, tokenizer_dir)
    moe = released_dir(tmp_path / "m3moe", qwen3_state(experts=3), tokenizer_dir)
    minimind2_dir = reference_hf_dir(tmp_path / "m2", tiny_model(), tokenizer_dir)
    torch.save(minimind2_state(), tmp_path / "m2.pth")
    torch.save({**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(50, 64)}, tmp_path / "rows.pth")
    torch.save({k: v for k, v in state.items() if "layers.1.self_attn.v_proj" not in k}, tmp_path / "missing.pth")
    torch.save({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(96)}, tmp_path / "bias.pth")
    torch.save({"transformer.wte.weight": torch.zeros(8, 4)}, tmp_path / "gpt2.pth")
    qwen = tmp_path / "qwen3"
    transformers_qwen3(state, qwen)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, qwen / name)

    def variant(name, edit):
        path = tmp_path / name
        shutil.copytree(dense, path)
        edit(path)
        return path

    def edit_config(**fields):
        def edit(path):
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, **fields}))
        return edit

    cases = [
        ([minimind2_dir, "--from", "minimind3"], "m2: no 'model.layers.0.self_attn.q_norm.weight' (QK-norm): a "
         "MiniMind2-style checkpoint, not minimind-3; use --from minimind2"),
        ([dense, "--from", "minimind2"], "_norm.weight' (QK-norm), a minimind-3 checkpoint, not MiniMind2; use --from "
         "minimind3"),
        ([tmp_path / "m2.pth", "--from", "minimind3", "--tokenizer", tok], "m2.pth: MiniMind2's layout"),
        ([tmp_path / "gpt2.pth", "--from", "minimind3", "--tokenizer", tok],
         "gpt2.pth: missing key 'model.embed_tokens.weight'"),
        ([tmp_path / "rows.pth", "--from", "minimind3", "--tokenizer", tok],
         "rows.pth: 'model.layers.0.self_attn.k_proj.weight' has 50 rows, not a multiple of head_dim 24"),
        ([tmp_path / "missing.pth", "--from", "minimind3", "--tokenizer", tok],
         "missing.pth: missing key 'model.layers.1.self_attn.v_proj.weight'"),
        ([tmp_path / "bias.pth", "--from", "minimind3", "--tokenizer", tok],
         "bias.pth: unexpected key 'model.layers.0.self_attn.q_proj.bias'"),
        ([tmp_path / "m3.pth", "--from", "minimind3"], "--from minimind3 needs --tokenizer DIR for a .pth"),
        ([tmp_path / "absent.pth", "--from", "minimind3", "--tokenizer", tok], "absent.pth: no such file"),
        ([variant("head", edit_config(head_dim=16)), "--from", "minimind3"],
         "config.json: field 'head_dim' is 16 but the weights give 24"),
        ([variant("noweights", lambda p: (p / "model.safetensors").unlink()), "--from", "minimind3"],
         "no model.safetensors or pytorch_model.bin beside config.json"),
        ([variant("llama", edit_config(model_type="llama")), "--from", "minimind3"],
         "model_type is 'llama', expected 'minimind'"),
        ([dense, "--from", "qwen3"], "model_type is 'minimind', expected 'qwen3' or 'qwen3_moe'"),
        ([qwen, "--from", "minimind3"], "model_type is 'qwen3', expected 'minimind'"),
        ([variant("untied", edit_config(tie_word_embeddings=False)), "--from", "minimind3"],
         "field 'tie_word_embeddings' is false"),
        ([variant("bias", edit_config(attention_bias=True)), "--from", "minimind3"], "field 'attention_bias' is true"),
        ([variant("window", edit_config(use_sliding_window=True)), "--from", "minimind3"],
         "field 'use_sliding_window' is true"),
        ([moe, "--from", "minimind3", "--experts-per-tok", "5"],
         "'num_experts_per_tok' (5) must be between 1 and 'n_routed_experts' (3)"),
        ([dense, "--from", "qwen3", "--preset", "small"], "--preset applies only to --from minimind2"),
        ([dense, "--to", "qwen3", "--tokenizer", tok], "--tokenizer applies only to --from minimind2, minimind3 or qwen3"),
    ]
    capsys.readouterr()  # drop the progress bars of the setup
    for flags, message in cases:
        out = tmp_path / "out"
        assert main(["convert", *map(str, flags), "--out", str(out)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not out.exists() and not list(tmp_path.glob(".out.*")), flags


def test_special_ids_come_from_config_json_else_from_the_tokenizer():
    from minimind.convert.minimind3 import qk_norm_config

    state, tokenizer_ids = qwen3_state(), {"bos_token_id": None, "eos_token_id": 7, "pad_token_id": 5}
    saved_by_transformers_5 = {**hf_fields(), "bos_token_id": None, "eos_token_id": None}
    config = qk_norm_config(state, "dir", saved_by_transformers_5, token_ids={"eos_token_id": 7, "pad_token_id": 5})
    assert (config.eos_token_id, config.pad_token_id) == (7, 5)
    config = qk_norm_config(state, "dir", hf_fields(), token_ids={k: v for k, v in tokenizer_ids.items() if v})
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 5)
