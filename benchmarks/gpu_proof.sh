#!/usr/bin/env bash
# The GPU proof in one go (docs/results.md): real-kernel tests, the three backend runs plus a repeat of varlen
# (the noise floor), the comparison, and the evaluation matrix with the mutation column. Writes everything to
# DEST (default $OUT or /tmp/proof) and a tarball of it beside.
#   bash benchmarks/gpu_proof.sh [DEST]
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
dest=${1:-${OUT:-/tmp/proof}}
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)  # relative to the caller's folder
cd "$(dirname "$0")/.."
work=/tmp/proof-work
rm -rf "$work" && mkdir -p "$work"  # a rerun must train anew, not resume the finished runs
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RECIPES_CACHE=${RECIPES_CACHE:-/tmp/recipes-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python=${PYTHON:-python3}
{
  nvidia-smi -L
  "$python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
} | tee "$dest/machine.txt"

GPU_RESULTS_DIR="$dest" "$python" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tail -40 | tee "$dest/kernels.log"

PYTHON=$python bash scripts/train_backends.sh --out "$work/backends" --repeat varlen 2>&1 | tee "$dest/train_backends.log" | grep -v "] step " | tail -60
"$python" scripts/eval_matrix.py "$work"/backends/qwen3_{sdpa,flex,varlen} --step 300 --mutation \
  --json "$work/backends/eval_matrix.json" 2>&1 | tee "$dest/eval_matrix.log"

# Results for the repository: metrics, resolved configs, W&B offline runs, plots, tables (no checkpoints).
tar czf "$dest/proof.tar.gz" -C "$work" --exclude checkpoints --exclude 'wandb/*/tmp' --exclude 'wandb/*/files' backends
ls -la "$dest"
