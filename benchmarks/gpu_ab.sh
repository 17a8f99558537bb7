#!/usr/bin/env bash
# A/B of two trees of this repository in one device call, case by case, alternating (A B, B A, ...), since the
# same case differs ~6% between calls on one card (docs/results.md section 5): benchmarks/benchmark.py of each tree,
# Qwen3-0.6B by default, medians of steps 10-15, each run profiled over steps 7-9 with where its GPU waits
# (benchmarks/gpu_gaps.py). Then, on tree B: EXTRA cases alone (e.g. other flavors), and torchtitan 0.2.2's Trainer
# on the same work, as far as the budget allows (AB_BUDGET_S, default 560 s). FA4 importable first, as for
# gpu_speed.sh; WHEELS_DIR and QWEN3_TOKENIZER_DIR as there.
#   AB_CASES="varlen-document-8192-compile-fa4 ..." AB_EXTRA="varlen-document-8192-compile-fa4-f=1.7B" \
#     bash benchmarks/gpu_ab.sh WHEELS_DIR QWEN3_TOKENIZER_DIR TREE_A TREE_B [DEST]
# Writes DEST/{a,b}-CASE.json (benchmark.py's), DEST/{a,b}-CASE-{gaps.json,kernels.txt}, DEST/torchtitan.json and
# DEST/ab.md (the table, with the GPU's idle ms per step), and all of it packed as DEST.tgz (a device call brings
# back only a few files).
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
start=$SECONDS
budget=${AB_BUDGET_S:-560}
wheels=$(cd "$1" && pwd); tokenizer=$(cd "$2" && pwd); tree_a=$(cd "$3" && pwd); tree_b=$(cd "$4" && pwd)
dest=${5:-${OUT:-/tmp/ab-results}}
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
cases=${AB_CASES:-varlen-document-8192-compile-fa4 varlen-document-8192-compile-fa4-b3 sdpa-causal-8192-compile}
extra=${AB_EXTRA:-}
cd "$tree_b"
source benchmarks/gpu_env.sh  # wheels, environment, tokenizer
nvidia-smi -L > "$dest/machine.txt"
left() { echo $((budget - (SECONDS - start))); }
bench() {  # TREE NAME CASE: one benchmark.py run of CASE on TREE, profiled; DEST/NAME.json and where its GPU waits
  local tree=$1 name=$2 case=$3
  [ "$(left)" -gt 60 ] || { echo "$name: skipped, $(left) s of the budget left"; return; }
  timeout "$(left)" python3 "$tree/benchmarks/benchmark.py" --tokenizer "$tokenizer" --nproc 1 --steps 15 --skip 9 \
    --case-timeout 150 --torchtitan none --work "/tmp/ab-$name" --out "/tmp/ab-$name/out" --cases "$case" \
    --profile "$case" > "$dest/$name.log" 2>&1
  cp "/tmp/ab-$name/out/benchmark.json" "$dest/$name.json" 2>/dev/null
  local profile=/tmp/ab-$name/ours-$case/profile
  [ -f "$profile/trace.json" ] && cp "$profile/top_kernels.txt" "$dest/$name-kernels.txt" \
    && python3 benchmarks/gpu_gaps.py "$profile/trace.json" --json "$dest/$name-gaps.json" > /dev/null
  echo "$name: $(tail -1 "$dest/$name.log")"
}
first=a
for case in $cases; do  # A then B, then B then A for the next case: neither tree always runs on the warmer card
  if [ $first = a ]; then
    bench "$tree_a" "a-$case" "$case"; bench "$tree_b" "b-$case" "$case"; first=b
  else
    bench "$tree_b" "b-$case" "$case"; bench "$tree_a" "a-$case" "$case"; first=a
  fi
done
for case in $extra; do bench "$tree_b" "b-$case" "$case"; done
[ "$(left)" -gt 60 ] && timeout "$(left)" python3 benchmarks/benchmark.py --tokenizer "$tokenizer" --nproc 1 --steps 15 \
  --skip 9 --case-timeout 150 --cases --torchtitan varlen-document-8192-compile --work /tmp/ab-torchtitan \
  --out /tmp/ab-torchtitan/out > "$dest/torchtitan.log" 2>&1 && cp /tmp/ab-torchtitan/out/benchmark.json "$dest/torchtitan.json"
python3 - "$dest" $cases $extra <<'EOF'
import json, sys
from pathlib import Path
dest, cases = Path(sys.argv[1]), sys.argv[2:]
def rate(name):
    path = dest / f"{name}.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else []
    return results[0] if results and "error" not in results[0] else None
def idle(name):
    path = dest / f"{name}-gaps.json"
    return f"{json.loads(path.read_text())['gaps_ms_per_step']:.1f}" if path.is_file() else "—"
lines = ["| case | A tokens/s | B tokens/s | B / A | B useful MFU | B peak GiB | GPU idle ms/step A → B |",
         "|---|---|---|---|---|---|---|"]
for case in cases:
    a, b = rate(f"a-{case}"), rate(f"b-{case}")
    fmt = lambda r: f"{r['tokens_per_sec_per_gpu']:,.0f}" if r else "—"
    ratio = f"{b['tokens_per_sec_per_gpu'] / a['tokens_per_sec_per_gpu']:.3f}" if a and b else "—"
    mfu, peak = (f"{b['mfu']:.1%}", f"{b['peak_memory_gib']:.1f}") if b else ("—", "—")
    lines.append(f"| {case} | {fmt(a)} | {fmt(b)} | {ratio} | {mfu} | {peak} | {idle(f'a-{case}')} → {idle(f'b-{case}')} |")
titan = rate("torchtitan")
if titan:
    lines.append(f"| torchtitan 0.2.2 varlen-document-8192 × 2 | | {titan['tokens_per_sec_per_gpu']:,.0f} | | | "
                 f"{titan['peak_memory_gib']:.1f} |")
(dest / "ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
tar czf "$dest.tgz" -C "$(dirname "$dest")" "$(basename "$dest")"
echo "== done in $((SECONDS - start)) s"
