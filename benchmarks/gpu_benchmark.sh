#!/usr/bin/env bash
# The performance half of docs/results.md in one go on a 2-GPU machine: real-kernel tests, benchmarks/benchmark.py
# (the recipe per backend beside torchtitan 0.2.2's Trainer, GQA memory) and a torch.profiler summary of one case.
#   bash benchmarks/gpu_benchmark.sh QWEN3_TOKENIZER_DIR [DEST]      (benchmarks/prepare_qwen3_tokenizer.sh makes the dir)
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
tokenizer=$(cd "$1" && pwd)  # both relative to the caller's folder
dest=${2:-${OUT:-/tmp/benchmark-results}}
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RECIPES_CACHE=${RECIPES_CACHE:-/tmp/recipes-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python=${PYTHON:-python3}
{ nvidia-smi -L; "$python" -c "import torch; print('torch', torch.__version__)"; } | tee "$dest/machine.txt"
GPU_RESULTS_DIR="$dest" "$python" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tail -15
"$python" benchmarks/benchmark.py --tokenizer "$tokenizer" --nproc 2 --gqa-memory --steps 20 --skip 8 --case-timeout 150 \
  --torchtitan sdpa-causal-4096-compile varlen-document-8192-compile \
  --cases sdpa-causal-4096-compile varlen-document-4096-compile flex-document-4096-compile \
          varlen-document-8192-compile sdpa-causal-8192-compile flex-document-8192-compile sdpa-causal-4096-eager \
  --out "$dest" 2>&1 | tail -25
"$python" -m torch.distributed.run --standalone --nproc_per_node 2 train.py --config configs/qwen3_varlen.toml \
  --model.flavor 0.6B --training.seq_len 8192 --training.local_batch_size 2 --training.steps 10 \
  --training.compile true --data.tokenizer "$tokenizer" --checkpoint.enable false --metrics.wandb false \
  --metrics.profile true --job.output_dir /tmp/profile-varlen-8192 > "$dest/profile.log" 2>&1
cp /tmp/profile-varlen-8192/profile/top_kernels.txt "$dest/top_kernels_varlen_8192.txt" && head -45 "$dest/top_kernels_varlen_8192.txt"
