#!/usr/bin/env bash
# The speed levers (issue 18) on 1×H200 in one device call of ~8 minutes, every part timed against a budget:
#   1. runs: benchmarks/benchmark.py, Qwen3-0.6B at 8192 (medians of steps 10–15): torchtitan 0.2.2's Trainer (varlen
#      document, 8192 × 2); ours varlen document FA4 8192 × 2, at 8192 × 3 (the batch for ≤ 45 GiB, profiled), and
#      sdpa causal 8192 × 2 (the same tokens, for the FA4 / sdpa ratio);
#   2. levers: benchmarks/levers.py, 4B blocks fwd+bwd bf16 vs float8 (kept only at ≥ 1.1×), and AdamW fused vs
#      foreach over the 0.6B model's FSDP parameters;
#   3. loss: benchmarks/loss.py at one 8192 × 3 step's 24,576 tokens: ours (chunk 4096) against QuACK's and Liger's
#      fused linear cross-entropy;
#   4. tiles: benchmarks/levers.py --parts fa4-tiles, FA4's SM90 backward under each feasible tile shape against
#      the configuration FA4 picks, one 0.6B layer's attention on 24,576 packed tokens;
#   5. inductor: FA4 8192 × 3 as compiled by default, with coordinate-descent tuning, the default again, then with
#      max-autotune for the GEMMs (benchmark.py's cdt and autotune options; its cold start alone took ~4 min), each
#      profiled; INDUCTOR_CASES sets other cases. Give it SPEED_BUDGET_S of ~480 s alone.
# docs/results.md section 5 has its results of 2026-12-03 (then with two more levers, since dropped: fused q/k/v and
# gate/up projections, and a bfloat16 grad_weight sum in the loss). float8's loss check: gpu_float8_check.sh.
# Usage, FA4 importable first (benchmarks/gpu_setup.sh fa4-stage, then fa4-install) and WHEELS_DIR from
# benchmarks/gpu_setup.sh wheels (torchtitan 0.2.2, torchao 0.18.0 and their needs):
#   bash benchmarks/gpu_speed.sh WHEELS_DIR QWEN3_TOKENIZER_DIR [DEST] [PARTS]
# DEST defaults to $OUT; PARTS is a comma list of runs, levers, loss (the default), tiles, inductor and tests (pytest -m gpu
# tests/gpu/test_fa4.py: FA4 in compiled blocks, ~1 min). SPEED_BUDGET_S (default
# 510) bounds the whole script: a part that would start past it is skipped, one that runs into it is stopped,
# and what finished is kept (each writes its JSON after every case).
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
start=$SECONDS
budget=${SPEED_BUDGET_S:-510}
wheels=$(cd "$1" && pwd); tokenizer=$(cd "$2" && pwd)
dest=${3:-${OUT:-/tmp/speed-results}}; parts=${4:-runs,levers,loss}
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # wheels, environment, tokenizer
{ nvidia-smi -L; git rev-parse --short HEAD 2>/dev/null; python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } \
  2>&1 | tee "$dest/machine.txt"
left() { echo $((budget - (SECONDS - start))); }
want() {  # part $1 was asked for and at least $2 s of the budget are left
  [[ ",$parts," == *",$1,"* ]] || return 1
  [ "$(left)" -gt "$2" ] || { echo "== $1: skipped, $(left) s of the budget left"; return 1; }
}

if want tests 60; then
  echo "== tests ($(left) s left)"
  GPU_RESULTS_DIR="$dest" timeout "$(left)" python3 -m pytest -m gpu tests/gpu/test_fa4.py -q -rs -p no:cacheprovider \
    2>&1 | tail -4
fi
if want runs 120; then
  echo "== runs ($(left) s left)"
  timeout "$(left)" python3 benchmarks/benchmark.py --tokenizer "$tokenizer" --nproc 1 --steps 15 --skip 9 --case-timeout 150 \
    --torchtitan varlen-document-8192-compile \
    --cases varlen-document-8192-compile-fa4 varlen-document-8192-compile-fa4-b3 sdpa-causal-8192-compile \
    --profile varlen-document-8192-compile-fa4-b3 --out "$dest/runs" > "$dest/runs.log" 2>&1
  tail -3 "$dest/runs.log"
  python3 - "$dest/runs/benchmark.json" benchmarks <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[2])
import benchmark
results = json.load(open(sys.argv[1]))["results"]
print(benchmark.markdown(results))
for r in results:
    if "profile" in r:  # where the step's time goes after the change
        print(f"profile of {r['case']}:", *r["profile"].splitlines()[:24], sep="\n")
EOF
fi
if want levers 60; then
  echo "== levers ($(left) s left)"
  timeout "$(left)" python3 benchmarks/levers.py --parts adamw,blocks --flavor 4B --variants bf16,fp8 \
    --adamw-flavor 0.6B --out "$dest/levers.json" > "$dest/levers.log" 2>&1
  tail -6 "$dest/levers.log"
fi
if want loss 30; then
  echo "== loss ($(left) s left)"
  timeout "$(left)" python3 benchmarks/loss.py --tokens 24576 --chunks 4096 \
    --repeats 8 --out "$dest/loss.json" > "$dest/loss.log" 2>&1
  tail -6 "$dest/loss.log"
fi
if want tiles 60; then
  echo "== tiles ($(left) s left)"
  timeout "$(left)" python3 benchmarks/levers.py --parts fa4-tiles --flavor 0.6B --tokens 24576 \
    --out "$dest/tiles.json" > "$dest/tiles.log" 2>&1
  tail -14 "$dest/tiles.log"
fi
if want inductor 300; then
  echo "== inductor ($(left) s left)"
  base=varlen-document-8192-compile-fa4-b3
  cases=${INDUCTOR_CASES:-"$base $base-cdt $base $base-autotune"}
  timeout "$(left)" python3 benchmarks/benchmark.py --tokenizer "$tokenizer" --nproc 1 --steps 15 --skip 9 \
    --case-timeout 400 --torchtitan none --cases $cases --profile $cases --out "$dest/inductor" \
    > "$dest/inductor.log" 2>&1
  tail -9 "$dest/inductor.log"
fi
echo "== done in $((SECONDS - start)) s; results in $dest"
