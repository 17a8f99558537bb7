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
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
caller=$PWD  # a relative --out is the caller's, not the repository's (the script works from the repository root)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out="outputs/backends-$(date +%Y%m%d-%H%M%S)"
nproc=""
repeat=""
value() {  # the value of option $1, which must be there
  [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || { echo "train_backends.sh: $1 needs a value" >&2; exit 2; }
}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) value "$@"; out=$(cd "$caller" && realpath -m -- "$2"); shift 2 ;;
    --nproc) value "$@"; nproc=$2; shift 2 ;;
    --repeat) value "$@"; repeat=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "train_backends.sh: unknown option $1; see the usage at the top of the script" >&2; exit 2 ;;
  esac
done
if [ -z "$nproc" ]; then  # the GPUs nvidia-smi lists, else one process
  nproc=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)
  [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1
fi
case "$nproc" in
  ''|*[!0-9]*|0) echo "train_backends.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 2 ;;
esac
case "$repeat" in
  ""|sdpa|flex|varlen) ;;
  *) echo "train_backends.sh: --repeat must name a backend (sdpa, flex or varlen), got '$repeat'" >&2; exit 2 ;;
esac
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
