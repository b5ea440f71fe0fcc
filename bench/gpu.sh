#!/usr/bin/env bash
# One prepared run of the performance benches on a lent GPU machine, under 10 minutes:
#   bf16 + torch.compile training of `small`, ours against HF LlamaForCausalLM, with MFU against the bf16
#   GEMM ceiling measured on the spot (and the datasheet peak); the CLI's pretrain (compiled), sft and eval
#   on the GPU, as a user runs them; decode throughput; the same training bench for `base`;
#   the peak GPU memory of a training step (ours with the chunked head loss, ours with whole logits, HF);
#   the MoE presets' training step and batch-8 decode against transformers' Qwen MoE (bench/moe.py); the
#   reference project's recipe (bench/reference.py); prefix caching's time to first token (bench/prefix.py);
#   last, the kernels a compiled `small` step spends its time in (bench/profile_step.py), ours and HF.
#   Most important first, each command under its own time limit (STEP_LIMIT seconds, default 200), so a
#   slow compile cannot starve the rest, and all of them within TOTAL_LIMIT seconds (default 510, so the
#   whole script ends within 9 minutes): a command gets what is left, and none starts with under 20 s left.
#
#   bash bench/gpu.sh                 # on the GPU machine; figures go to $OUT/gpu-results.{txt,jsonl}
#   bash bench/gpu.sh --cpu-check     # here: every command once on CPU with --quick (is it broken?)
#
# Environment: PYTHON (default .venv/bin/python if present, else python3) must have torch with CUDA and transformers; the repository root is
# the working directory. Each command's output is appended to the text file as it runs, so a run cut short
# by the time limit still leaves what finished.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT_DIR=${OUT:-bench-results}
mkdir -p "$OUT_DIR"
TXT="$OUT_DIR/gpu-results.txt"
JSON="$OUT_DIR/gpu-results.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MINIMIND_NO_PROGRESS=1

if [[ "${1:-}" == "--cpu-check" ]]; then
  DEV=(--device cpu --quick)
  TRAIN_SMALL=(); TRAIN_BASE=(); DECODE=(--gguf-types); MEMORY=(); PROFILE=(--top 5); REFERENCE=()
  MOE=(); PREFIX=(--no-llamacpp); BUDGET=36000  # a check on a busy CPU may take long; it is not timed
else
  DEV=(--device cuda)
  TRAIN_SMALL=(--preset small --batch-size 32 --seq-len 512 --repeats 5)
  TRAIN_BASE=(--preset base --batch-size 32 --seq-len 512 --repeats 5)
  DECODE=(--preset small --new-tokens 128 --repeats 3 --batch-sizes 1 8 64 --gguf-types)
  MEMORY=(--preset small --batch-size 32 --seq-len 512)
  PROFILE=(--preset small --batch-size 32 --seq-len 512 --top 12)
  REFERENCE=(--preset minimind3 --batch-size 32 --seq-len 340 --repeats 3)
  MOE=(--batch-size 16 --seq-len 512 --repeats 3 --new-tokens 64)
  PREFIX=(--no-llamacpp --repeats 3)  # llama.cpp here would be a CPU build against our GPU
  BUDGET=510
fi

STEP_LIMIT=${STEP_LIMIT:-200}
TOTAL_LIMIT=${TOTAL_LIMIT:-$BUDGET}
run() {  # run <label> <command...>: log the command, its output and its status; keep going on failure
  local left=$((TOTAL_LIMIT - SECONDS))
  if ((left < 20)); then echo "=== $1: skipped, ${left} s left of TOTAL_LIMIT=$TOTAL_LIMIT" | tee -a "$TXT"; return; fi
  echo "=== $1: ${*:2}" | tee -a "$TXT"
  local start=$SECONDS
  timeout -k 10 "$((left < STEP_LIMIT ? left : STEP_LIMIT))" "${@:2}" 2>&1 | tee -a "$TXT"
  echo "=== $1: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$TXT"
}

echo "=== $(date -u +%FT%TZ) $(hostname)" | tee -a "$TXT"
run env "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
command -v nvidia-smi >/dev/null && run nvidia-smi nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
run train-small "$PY" bench/train.py "${DEV[@]}" --dtype bf16 --compile "${TRAIN_SMALL[@]}" --json "$JSON"
CLI_DIR=$(mktemp -d)  # the CLI stages on the GPU, as a user runs them (the demo pins --device cpu)
DATA=minimind/demo_data
GPU_STAGE=(--device cuda --dtype bf16 --log-every 10); SHAPE=()
if [[ "${1:-}" == "--cpu-check" ]]; then  # later flags win: a few short steps of a narrow model
  GPU_STAGE=(--device cpu --dtype fp32 --log-every 10 --max-steps 3 --batch-size 4 --max-seq-len 128)
  SHAPE=(--set dim=64 --set n_layers=2)
fi
run cli-tokenizer "$PY" -m minimind tokenizer --data $DATA/pretrain.jsonl --vocab-size 6400 --out "$CLI_DIR/tok"
run cli-pretrain "$PY" -m minimind pretrain --data $DATA/pretrain.jsonl --tokenizer "$CLI_DIR/tok" --preset small \
  --max-steps 60 --warmup-steps 5 --batch-size 32 --max-seq-len 512 --compile --out "$CLI_DIR/pre" "${GPU_STAGE[@]}" "${SHAPE[@]}"
run cli-sft "$PY" -m minimind sft --data $DATA/sft.jsonl --init "$CLI_DIR/pre" --max-steps 30 --warmup-steps 5 \
  --batch-size 16 --max-seq-len 512 --out "$CLI_DIR/sft" "${GPU_STAGE[@]}"
run cli-eval "$PY" -m minimind eval --model "$CLI_DIR/pre" --task ppl --data $DATA/pretrain_eval.jsonl \
  --device "${GPU_STAGE[1]}"
for stage in pre sft; do cp "$CLI_DIR/$stage/metrics.jsonl" "$OUT_DIR/cli-$stage-metrics.jsonl" 2>/dev/null; done
rm -rf "$CLI_DIR"
run decode "$PY" bench/decode.py "${DEV[@]}" --dtype bf16 --compile "${DECODE[@]}" --json "$JSON"
run train-base "$PY" bench/train.py "${DEV[@]}" --dtype bf16 --compile "${TRAIN_BASE[@]}" --json "$JSON"
# the MoE presets against transformers' Qwen2-MoE / Qwen3-MoE: training step, and decode at batch 8
run moe "$PY" bench/moe.py "${DEV[@]}" --dtype bf16 "${MOE[@]}" --json "$JSON"
# the reference project's pretraining recipe (one padded document per row) against our packed rows, minimind-3
run reference "$PY" bench/reference.py "${DEV[@]}" --dtype bf16 "${REFERENCE[@]}"
run prefix "$PY" bench/prefix.py "${DEV[@]}" --dtype bf16 "${PREFIX[@]}" --json "$JSON"
run memory "$PY" bench/memory.py "${DEV[@]}" --dtype bf16 "${MEMORY[@]}"
run profile "$PY" bench/profile_step.py "${DEV[@]}" --dtype bf16 --compile "${PROFILE[@]}"
echo "=== done; results in $TXT and $JSON" | tee -a "$TXT"
