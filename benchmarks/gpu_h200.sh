#!/usr/bin/env bash
# The 1×H200 measurements in docs/results.md, on a machine that has the GPU image's python3 (torch 2.11):
# GPU tests (FA4 against float64 and FA2), the fused loss against the plain one, benchmarks/benchmark.py beside
# torchtitan 0.2.2's Trainer, the largest batch at 8192, a profile, and the flavors × activation-checkpointing
# memory table. Results go to DEST (default $OUT).
#   bash benchmarks/gpu_h200.sh WHEELS_DIR QWEN3_TOKENIZER_DIR PART [DEST]
# WHEELS_DIR: wheels the image lacks (benchmarks/gpu_setup.sh wheels); FA4 must already be importable
# (benchmarks/gpu_setup.sh fa4-stage, then fa4-install, first). QWEN3_TOKENIZER_DIR: benchmarks/prepare_qwen3_tokenizer.sh's
# folder (tokenizer.json may be xz'ed). PART: tests | speed | memory | all.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
wheels=$(cd "$1" && pwd); tokenizer=$(cd "$2" && pwd); part=$3
dest=${4:-${OUT:-/tmp/h200-results}}
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # wheels, environment, tokenizer
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$dest/machine.txt"
bench() { python3 benchmarks/benchmark.py --tokenizer "$tokenizer" --nproc 1 --case-timeout 120 "$@"; }

if [ "$part" = tests ] || [ "$part" = all ]; then
  GPU_RESULTS_DIR="$dest" python3 -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 | tail -12
  python3 benchmarks/loss.py --out "$dest/loss.json" 2>&1 | tail -12
fi
if [ "$part" = speed ] || [ "$part" = all ]; then
  bench --steps 14 --skip 6 --torchtitan varlen-document-8192-compile \
    --cases varlen-document-8192-compile-fa4 varlen-document-8192-compile-torch sdpa-causal-8192-compile \
            varlen-document-8192-compile-fa4-b4 varlen-document-8192-compile-fa4-b8 flex-document-8192-compile \
    --profile varlen-document-8192-compile-fa4-b4 --out "$dest/speed" 2>&1 | tail -10
fi
if [ "$part" = memory ] || [ "$part" = all ]; then
  cases=()
  for flavor in 0.6B 1.7B 4B; do
    for ac in none selective full; do cases+=("varlen-document-4096-compile-fa4-b4-ac=$ac-f=$flavor"); done
  done
  bench --steps 10 --skip 5 --torchtitan none --cases "${cases[@]}" --out "$dest/memory" 2>&1 | tail -11
fi
