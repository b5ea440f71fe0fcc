"""Export and import between formats: plain HF Llama / Qwen2-MoE / Qwen3 / Qwen3-MoE, GGUF, MiniMind2 and
minimind-3 `.pth` and transformers directories; LoRA merge.

    minimind convert DIR --to llama --out OUT
    minimind convert DIR --to qwen3 --out OUT                      QK-norm (minimind-3) models
    minimind convert DIR --to gguf --out FILE.gguf [--dtype f32|f16|q8_0|q4_0]
    minimind convert FILE.pth --from minimind2 --tokenizer TOKDIR [--preset small|base|moe] --out OUT
    minimind convert DIR --to minimind2 --out FILE.pth
    minimind convert HF_DIR --from minimind3 --out OUT              or FILE.pth --tokenizer TOKDIR
    minimind convert DIR --to minimind3 --out FILE.pth
    minimind convert HF_DIR --from qwen3 --out OUT
    minimind convert BASE --merge-lora ADAPTER --out OUT

One module per format (`minimind3.py` reads both minimind-3's and Qwen3's checkpoints: they share one layout);
`layout.py` holds the weight-layout facts they share (RoPE row orders).
"""
