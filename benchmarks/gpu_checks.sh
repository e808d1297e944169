#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one run on one GPU (an H100 or H200, no network):
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR]
#
# Every part has its own time limit and log (LOG_DIR/<part>.log, default gpu-checks/); a part that
# fails or runs out of time does not stop the others, and the end of each log is printed. The
# sizes are chosen to finish in about eight minutes: a 200-step fine-tune with and without
# torch.compile, AdaMerging's memory on eight base-sized models, merge.py test of a base-sized
# pool on the GPU against a bare loop, the evaluation forward's images/s, the evaluation data
# path's images/s per worker, RegMean's Gram pass and closed-form merge on the GPU.
# Needs ../shared/data beside the checkout (the real samples) for the data parts.
set -u
out=${1:-gpu-checks}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

part() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $(($(date +%s) - start)) s"
    grep -vE "^\s*$|it/s\]|s/it\]|examples/s\]|Warning|warn\(" "$out/$name.log" | tail -n 14
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, lightning, transformers, datasets, jsonargparse; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'cpus', __import__('os').cpu_count())"
part compile 210 "$py" -m benchmarks.compile_check --steps 200 --rerun-steps 50
part adamerging 100 "$py" -m benchmarks.adamerging_memory --device cuda --steps 3 --batch-size 16 --cache /tmp/convnext-fusion-bench
part eval_gpu 120 "$py" -m benchmarks.eval_throughput --model base --accelerator gpu --sizes 224 --workers 16 --repeats 2 --batch-size 256
part forward 30 "$py" -m benchmarks.gpu_throughput --jpegs ../shared/data/dtd-10class-sample --parts eval
part data_path 90 "$py" -m benchmarks.eval_data_path --workers 1,4,16 --batch-size 256
part regmean 60 "$py" -m benchmarks.regmean_speed --models base --device cuda --batch-size 64 --cache /tmp/convnext-fusion-bench
