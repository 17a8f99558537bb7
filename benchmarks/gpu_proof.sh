#!/usr/bin/env bash
# The backend proof on one GPU, with its false-alarm and mutation checks (docs/compare.md, docs/results.md):
# - three honest proofs, seeds 1234, 1 and 2: scripts/train_backends.sh (warm start: configs/qwen3_sdpa.toml for
#   200 steps, then sdpa, flex, varlen and a repeat of sdpa continue 60 steps from copies of it), run side by side;
#   each must AGREE;
# - each mutation of recipes/qwen3/mutation.py (layout on varlen, leak on flex, scale on varlen) continues seed
#   1234's start checkpoint through tests/process/train_mutated.py, and is compared with that proof's honest runs
#   (the mutated backend's honest run left out: its config would make it the mutant's repeat): it must DISAGREE,
#   while the honest pairs in the same comparison pass.
# Writes runs (metrics, configs, W&B offline runs; no checkpoints), compare.{png,json,txt}, eval matrices, logs and
# summary.json to DEST (default $OUT or /tmp/proof). About 5 minutes on 1×H200. Exit code 0 when every verdict is
# the expected one. Options after DEST go to train_backends.sh (--preset cpu rehearses the whole script on a CPU).
#   bash benchmarks/gpu_proof.sh [DEST [train_backends.sh options]]
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
dest=${1:-${OUT:-/tmp/proof}}
shift || true
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)  # relative to the caller's folder
cd "$(dirname "$0")/.."
work=/tmp/proof-work
rm -rf "$work" && mkdir -p "$work"  # a rerun must train anew, not resume the finished runs
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RECIPES_CACHE=${RECIPES_CACHE:-/tmp/recipes-cache}
. scripts/python.sh  # sets $python
export PYTHON=$python
{
  nvidia-smi -L
  "$python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  "$python" -m pip list 2>/dev/null | grep -i -E "^(flash|torch |wandb)" || true
} | tee "$dest/machine.txt"
start=$(date +%s)

pids=()  # what runs now: a signal stops them (train_backends.sh stops its own runs) before this script exits
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; echo "gpu_proof.sh: stopped" >&2; exit 130' INT TERM
seeds=(1234 1 2)
for seed in "${seeds[@]}"; do
  bash scripts/train_backends.sh --out "$work/seed$seed" --nproc 1 "$@" -- --training.seed "$seed" \
    > "$dest/seed$seed.log" 2>&1 &
  pids+=($!)
  if [ ${#pids[@]} -eq 1 ]; then  # the first one fills the tokenizer and data cache before the others read it
    for _ in $(seq 300); do [ -s "$work/seed$seed/start/metrics.jsonl" ] && break; sleep 1; done
  fi
done
status=()
for pid in "${pids[@]}"; do wait "$pid"; status+=($?); done
echo "honest proofs: exit codes ${status[*]} after $(( $(date +%s) - start )) s"

proof=$work/seed1234
declare -A mutated=([layout]=varlen [leak]=flex [scale]=varlen)
pids=()
for mutation in layout leak scale; do
  backend=${mutated[$mutation]}
  run_dir=$work/mutation-$mutation/qwen3_${backend}_$mutation
  mkdir -p "$run_dir"
  cp "$proof/start/config.toml" "$run_dir/"
  cp -r "$proof/start/checkpoints" "$run_dir/"
  # The honest continuation's resolved config: the mutant differs from it in its attention code alone.
  "$python" -m torch.distributed.run --standalone --nproc_per_node 1 tests/process/train_mutated.py "$mutation" \
    --config "$proof/qwen3_$backend/config.toml" --job.output_dir "$run_dir" --job.name "$(basename "$run_dir")" \
    --metrics.wandb_group "mutation-$mutation" \
    > "$dest/mutation-$mutation.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
pids=()
for mutation in layout leak scale; do
  backend=${mutated[$mutation]}
  honest=() labels=""
  for name in sdpa sdpa_repeat flex varlen; do
    [ "$name" = "$backend" ] || { honest+=("$proof/qwen3_$name"); labels+="${name/_/ },"; }
  done
  "$python" scripts/compare_runs.py "${honest[@]}" "$work/mutation-$mutation/qwen3_${backend}_$mutation" \
    --labels "${labels}$backend MUTATED ($mutation)" \
    --png "$work/mutation-$mutation/compare.png" --json "$work/mutation-$mutation/compare.json" \
    > "$work/mutation-$mutation/compare.txt" 2>&1
  echo "mutation $mutation ($backend): compare_runs.py exit code $?"
done

# Results for the repository: metrics, resolved configs, W&B offline runs, plots, tables (no checkpoints).
tar cf - -C "$work" --exclude checkpoints --exclude 'wandb/*/tmp' --exclude 'wandb/*/files' . | tar xf - -C "$dest"
"$python" - "$dest" <<'EOF'
"""summary.json: each verdict against the expected one, and the numbers that decided it."""
import json
import sys
from pathlib import Path

dest = Path(sys.argv[1])
summary, ok = {}, True
for table in sorted(dest.glob("*/compare.json")):
    result = json.loads(table.read_text())
    mutation = table.parent.name.startswith("mutation-")  # its mutated run is labelled "... MUTATED (...)"
    honest_pairs = [p for p in result["pairs"] if "MUTATED" not in p["a"] + p["b"]]
    mutant_pairs = [p for p in result["pairs"] if p not in honest_pairs]
    expected = "DISAGREE" if mutation else "AGREE"
    good = (result["verdict"] == expected and not any(p["failed"] for p in honest_pairs)
            and all(p["failed"] for p in mutant_pairs))
    ok &= good
    summary[table.parent.name] = {
        "verdict": result["verdict"], "expected": expected, "as_expected": good, "calibrated": result["calibrated"],
        "floor": result["floor"], "tolerance": result["tolerance"],
        "honest_max": {s: max((p["values"][s] or 0) for p in honest_pairs) for s in result["tolerance"]},
        "mutant_min": {s: min((p["values"][s] or 0) for p in mutant_pairs) for s in result["tolerance"]}
        if mutant_pairs else None,
        "eval_matrix_spread": (result["eval_matrix"] or {}).get("max_spread"),
    }
(dest / "summary.json").write_text(json.dumps({"all_as_expected": ok, "proofs": summary}, indent=1) + "\n")
for name, row in summary.items():
    print(f"{name:18} {row['verdict']:9} expected {row['expected']:9} {'ok' if row['as_expected'] else 'WRONG'}  "
          f"honest max {row['honest_max']}  mutant min {row['mutant_min']}  tolerance {row['tolerance']}")
print("all as expected" if ok else "NOT all as expected")
sys.exit(0 if ok else 1)
EOF
result=$?
echo "total $(( $(date +%s) - start )) s"
exit "$result"
