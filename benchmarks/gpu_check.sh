#!/usr/bin/env bash
# The GPU figures in one go (issue 18), within 12 minutes on one H100/H200-class card, everything under one folder:
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default: outputs/gpu_check-<UTC time>
#
#   1. benchmarks/benchmark.py --device cuda          -> OUTPUT_DIR/results_gpu.json            (budget 3 min)
#   2. benchmarks/scale_out.py --device cuda          -> OUTPUT_DIR/scale_out_gpu.json          (budget 2.5 min)
#      (compiled training step; batch-1 and batch-256 generation: plain GPT-2, dynamic, static, static + compile)
#   3. scalevae compare --preset ptb-gpu, one seed, VAE / free bits / BN-VAE / Scale-VAE (des_std 1), shortened to
#      1,500 steps and 1,000 evaluation sentences with k = 50   -> OUTPUT_DIR/compare/            (budget 6 min)
#
# Each stage runs under `timeout`; a stage that runs out is logged and the next one starts. The comparison writes one
# JSON per finished run (OUTPUT_DIR/compare/runs/), so a second call with the same OUTPUT_DIR resumes it.
# Environment: PYTHON (default python), DATA_DIR (folder of ptb.{train,valid,test}.txt; default ../shared/data, then
# shared/data), STEPS / EVAL / K (the comparison's steps, evaluation sentences, importance samples: 1500, 1000, 50).
# A smoke run of the wiring on a CPU: DEVICE=cpu QUICK=1 STEPS=5 EVAL=16 K=2 bash benchmarks/gpu_check.sh /tmp/x
set -u
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check-$(date -u +%Y%m%dT%H%M%S)}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1500}
EVAL=${EVAL:-1000}
K=${K:-50}
QUICK=${QUICK:+--quick}
if [ -z "${DATA_DIR:-}" ]; then
    for candidate in ../shared/data shared/data; do
        [ -f "$candidate/ptb.train.txt" ] && DATA_DIR=$candidate && break
    done
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1

stage() {  # stage NAME SECONDS COMMAND...: run, log, time, and never stop the script
    local name=$1 budget=$2
    shift 2
    echo "== $name (budget ${budget}s): $*" | tee -a "$OUT/gpu_check.log"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$budget" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start))s" | tee -a "$OUT/gpu_check.log"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); print('transformers', transformers.__version__)"
    echo "DATA_DIR=${DATA_DIR:-<not found>}"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# shellcheck disable=SC2086  # $QUICK is empty or one word
stage benchmark 180 "$PYTHON" benchmarks/benchmark.py --device "$DEVICE" $QUICK --output "$OUT/results_gpu.json"
# shellcheck disable=SC2086
stage scale_out 150 "$PYTHON" benchmarks/scale_out.py --device "$DEVICE" $QUICK --output "$OUT/scale_out_gpu.json"
if [ -n "${DATA_DIR:-}" ]; then
    stage compare 360 "$PYTHON" -m scalevae.cli compare --preset ptb-gpu --data_dir "$DATA_DIR" \
        --runs vae free_bits bn scale_1 --des_std_sweep 1.0 --seeds 0 \
        --max_steps "$STEPS" --eval_sentences "$EVAL" --num_importance_samples "$K" --claims false \
        --output_dir "$OUT/compare"
else
    echo "== compare: skipped, no ptb.train.txt in ../shared/data or shared/data (set DATA_DIR)" | tee -a "$OUT/gpu_check.log"
fi
echo "done: $OUT ($SECONDS s)" | tee -a "$OUT/gpu_check.log"
