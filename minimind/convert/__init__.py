"""Export and import between formats: plain HF Llama / Qwen2-MoE, GGUF, MiniMind2 `.pth`; LoRA merge.

    minimind convert DIR --to llama --out OUT
    minimind convert DIR --to gguf --out FILE.gguf [--dtype f32|f16|q8_0]
    minimind convert FILE.pth --from minimind2 --tokenizer TOKDIR [--preset small|base|moe] --out OUT
    minimind convert DIR --to minimind2 --out FILE.pth
    minimind convert BASE --merge-lora ADAPTER --out OUT

One module per format; `layout.py` holds the weight-layout facts they share (RoPE row orders).
"""
