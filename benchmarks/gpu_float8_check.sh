#!/usr/bin/env bash
# Does training.float8 keep the loss? ~3 minutes on 1×H200. configs/qwen3_sdpa.toml (the small flavor: dims 512 and
# 1536, multiples of 16 as torchao's tensorwise float8 needs), compiled, trained from scratch for 300 steps three
# times: bf16, bf16 again (the repeat: the run-to-run floor) and float8, with the validation loss every 50 steps. Then
# scripts/compare_runs.py over the three (the bf16 pair is its repeat, so its tolerances are the proof's: margin × the
# repeat's floor); the decision is its val statistic, max |Δval_loss|, for float8 against each bf16 run: exit code 0
# when both are within the tolerance, 1 when not (the option then goes, issue 18). compare_runs.py's own verdict,
# early and late loss included, is printed beside it.
#   bash benchmarks/gpu_float8_check.sh WHEELS_DIR [DEST] [-- --section.key value ...]
# WHEELS_DIR from benchmarks/gpu_setup.sh wheels (torchao 0.18.0 among them). DEST defaults to $OUT; it receives
# each run's metrics.jsonl and config.toml, the logs, compare.json/.txt/.png. Overrides after -- go to every run.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
wheels=$(cd "$1" && pwd); shift
dest=${OUT:-/tmp/float8-check}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then dest=$1; shift; fi
[ "${1:-}" = "--" ] && shift
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # wheels, environment
{ nvidia-smi -L; python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"
} 2>&1 | tee "$dest/machine.txt"
work=/tmp/float8-check-work
rm -rf "$work" && mkdir -p "$work"  # a rerun trains anew
for run in bf16:false bf16_repeat:false float8:true; do
  name=${run%%:*}
  echo "== $name ($SECONDS s)"
  python3 -m torch.distributed.run --standalone --nproc_per_node 1 train.py --config configs/qwen3_sdpa.toml \
    --training.steps 300 --training.compile true --training.float8 "${run#*:}" --eval.interval 50 \
    --checkpoint.interval 0 --metrics.wandb false --job.output_dir "$work/$name" "$@" > "$dest/$name.log" 2>&1
  echo "rc=$?"; grep -E "val_loss|Error|error:" "$dest/$name.log" | tail -3
  mkdir -p "$dest/$name" && cp "$work/$name"/{metrics.jsonl,config.toml} "$dest/$name/" 2>/dev/null
done
python3 scripts/compare_runs.py "$work"/{bf16,bf16_repeat,float8} --labels bf16,bf16_repeat,float8 \
  --png "$dest/compare.png" --json "$dest/compare.json" 2>&1 | tee "$dest/compare.txt"
python3 - "$dest/compare.json" <<'PY'
import json, sys
table = json.load(open(sys.argv[1]))
limit = table["tolerance"]["val"]
print(f"val_loss: the bf16 repeat's floor {table['floor']['val']:.2e}, tolerance {limit:.2e}")
pairs = [pair for pair in table["pairs"] if "float8" in (pair["a"], pair["b"])]
for pair in pairs:
    print(f"  {pair['a']} vs {pair['b']}: max |Δval_loss| {pair['values']['val']} at step {pair['at_step']['val']}")
values = [pair["values"]["val"] for pair in pairs]
inside = table["calibrated"] and all(value is not None and value <= limit for value in values)
print("float8: val_loss", "within the floor, the option stays" if inside else "OUTSIDE the floor, the option goes")
sys.exit(0 if inside else 1)
PY
rc=$?
echo "== exit code $rc in $SECONDS s"
exit "$rc"
