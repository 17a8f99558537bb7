#!/usr/bin/env bash
# Trains configs/qwen3_{sdpa,flex,varlen}.toml on this node one after another, into one comparison folder and one
# W&B group, then compares the loss curves (exit code 1 when a pair disagrees beyond the tolerance).
#
#   bash scripts/train_backends.sh [--out DIR] [--nproc N] [--repeat BACKEND] [-- --section.key value ...]
#
# --out      comparison folder (default: outputs/backends-<date> in the repository); runs land in DIR/qwen3_<backend>
# --nproc    processes per run (default: the GPUs nvidia-smi lists, else 1)
# --repeat   also train BACKEND a second time (DIR/qwen3_<backend>_repeat): the run-to-run noise floor
# Overrides after -- go to every run. PYTHON selects the interpreter (default: python3).
set -euo pipefail
caller=$PWD  # a relative --out is the caller's, not the repository's (the script works from the repository root)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out="outputs/backends-$(date +%Y%m%d-%H%M%S)"
nproc=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)
repeat=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$(cd "$caller" && realpath -m -- "$2"); shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "train_backends.sh: unknown option $1; see the usage at the top of the script" >&2; exit 2 ;;
  esac
done
[ "${nproc:-0}" -ge 1 ] || nproc=1
group=$(basename "$out")
runs=()
train() {  # backend, run folder
  echo "== $1 -> $2"
  "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" train.py \
    --config "configs/qwen3_$1.toml" --job.output_dir "$2" --metrics.wandb_group "$group" "${@:3}"
}
for backend in sdpa flex varlen; do
  train "$backend" "$out/qwen3_$backend" "$@"
  runs+=("$out/qwen3_$backend")
done
if [ -n "$repeat" ]; then
  train "$repeat" "$out/qwen3_${repeat}_repeat" "$@"
  runs+=("$out/qwen3_${repeat}_repeat")
fi
"$python" scripts/compare_runs.py "${runs[@]}" --png "$out/compare.png" --json "$out/compare.json"
