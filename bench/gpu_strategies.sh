#!/usr/bin/env bash
# GPU check of the data-parallel strategies (docs/distributed.md): NCCL, bf16, fused AdamW, ZeRO-Offload with
# pinned memory — the paths the CPU tests (gloo, fp32) cannot reach. On every visible GPU, for ddp, fsdp,
# zero2 and zero2 --zero-offload: a 20-step pretrain of a small model stopped after 10 steps and resumed,
# then the per-step loss gap to ddp (fp32: expect < 1e-4; bf16: expect < 5e-2, engines round differently).
#
#   bash bench/gpu_strategies.sh            # all GPUs;  NPROC=2 bash bench/gpu_strategies.sh for two
# Needs: pip install -e '.[deepspeed]'. Writes into $WORK (default: a new temporary directory).
# DEVICE=cpu NPROC=2 MODEL="--preset tiny --set dim=64 --max-seq-len 32 --batch-size 2" runs it on CPU (gloo).
set -euo pipefail
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
MODEL=${MODEL:---preset small --set n_layers=4 --max-seq-len 256 --batch-size 8}
WORK=${WORK:-$(mktemp -d)}
DATA=minimind/demo_data/pretrain.jsonl
export MINIMIND_NO_PROGRESS=1

"$PY" -m minimind tokenizer --data "$DATA" --vocab-size 2048 --out "$WORK/tokenizer" > /dev/null
run() {  # run NAME DTYPE EXTRA...: 10 steps, stop, resume to 20
  local name=$1 dtype=$2; shift 2
  # shellcheck disable=SC2206  # MODEL is a list of flags
  local args=(pretrain --data "$DATA" --tokenizer "$WORK/tokenizer" $MODEL --max-steps 20 --warmup-steps 2
              --device "$DEVICE" --dtype "$dtype" --set dropout=0 --out "$WORK/$name" "$@")
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m minimind "${args[@]}" \
      --stop-after-steps 10 > "$WORK/$name.log" 2>&1
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m minimind "${args[@]}" \
      --resume >> "$WORK/$name.log" 2>&1
  echo "$name: ok ($(grep -c '"loss"' "$WORK/$name/metrics.jsonl") steps logged)"
}
for dtype in fp32 bf16; do
  run "ddp-$dtype" "$dtype"
  run "fsdp-$dtype" "$dtype" --strategy fsdp
  run "zero2-$dtype" "$dtype" --strategy zero2
  run "offload-$dtype" "$dtype" --strategy zero2 --zero-offload
done
"$PY" - "$WORK" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
def losses(name):
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
for dtype in ("fp32", "bf16"):
    ref = losses(f"ddp-{dtype}")
    print(f"{dtype}: ddp loss {ref[0]:.4f} -> {ref[-1]:.4f} over {len(ref)} steps")
    for name in ("fsdp", "zero2", "offload"):
        other = losses(f"{name}-{dtype}")
        gap = max(abs(a - b) for a, b in zip(ref, other))
        print(f"  {name:8s} max per-step loss gap to ddp: {gap:.2e} ({len(other)} steps)")
PY
