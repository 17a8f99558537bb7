#!/usr/bin/env bash
# False alarms of the backend proof on CPU: N honest proofs (scripts/train_backends.sh --preset cpu, seeds 1..N,
# W&B off), one after another; every one must AGREE. After each proof, writes the verdicts so far and the numbers
# that decided them to JSON (default docs/results/cpu/proof_false_alarms.json, which
# tests/quick/test_compare_runs.py checks): a stopped run keeps what it measured ("total" of "planned").
#   bash benchmarks/proof_false_alarms.sh [N [JSON]]        # N = 20: about 20 minutes on 2 idle cores
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
count=${1:-20}
cd "$(dirname "$0")/.."
json=${2:-docs/results/cpu/proof_false_alarms.json}
. scripts/python.sh  # sets $python
work=$(mktemp -d /tmp/proof-false-alarms.XXXXXX)
proof=""  # the proof in progress: a signal stops it (it stops its own runs) before this script exits
trap '[ -z "$proof" ] || kill -TERM "$proof" 2>/dev/null; wait; exit 130' INT TERM
record() {  # the number of proofs done
  "$python" - "$work" "$1" "$count" "$json" <<'EOF'
import json
import platform
import sys
from pathlib import Path

work, done, planned, path = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
proofs = []
for seed in range(1, done + 1):
    result = json.loads((work / f"seed{seed}" / "compare.json").read_text())
    proofs.append({
        "seed": seed, "verdict": result["verdict"], "calibrated": result["calibrated"], "dtype": result["dtype"],
        "largest": {stat: max(pair["values"][stat] or 0.0 for pair in result["pairs"]) for stat in result["floor"]},
        "tolerance": result["tolerance"], "eval_matrix_spread": result["eval_matrix"]["max_spread"],
        "loss_steps": result["runs"][0]["loss_steps"], "seconds": int((work / f"seed{seed}" / "seconds").read_text()),
    })
agree = sum(proof["verdict"] == "AGREE" for proof in proofs)
table = {"what": "honest proofs: scripts/train_backends.sh --preset cpu, seeds 1..N", "machine": platform.machine(),
         "proofs": proofs, "agree": agree, "total": len(proofs), "planned": planned,
         "false_alarm_rate": 1 - agree / len(proofs)}
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(table, indent=1) + "\n")
print(f"{agree} of {len(proofs)} honest proofs AGREE (false-alarm rate {table['false_alarm_rate']:.0%}); wrote {path}")
EOF
}
for seed in $(seq "$count"); do
  start=$(date +%s)
  PYTHON=$python bash scripts/train_backends.sh --preset cpu --nproc 1 --out "$work/seed$seed" \
    -- --training.seed "$seed" --metrics.wandb false > "$work/seed$seed.log" 2>&1 &
  proof=$!
  status=0
  wait "$proof" || status=$?
  proof=""
  echo "$(( $(date +%s) - start ))" > "$work/seed$seed/seconds"
  verdict=$(grep -E '^(AGREE|DISAGREE)' "$work/seed$seed.log" || echo "no verdict")
  echo "seed $seed: exit code $status, $verdict"
  record "$seed"
done
rm -rf "$work"
