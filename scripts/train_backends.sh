#!/usr/bin/env bash
# The backend proof in one command: do sdpa, flex and varlen train the same model? Prints AGREE or DISAGREE (the
# pair, the statistic, the tolerance and the floor it came from) and exits 0 or 1 (2: bad input).
#
#   bash scripts/train_backends.sh [--out DIR] [--nproc N] [--preset cpu] [--repeat BACKEND] [--from-scratch]
#                                  [--pretrain-steps P] [--steps W] [-- --section.key value ...]
#
# Warm start (the default): configs/qwen3_sdpa.toml trains P steps into DIR/start; then copies of that run folder
# continue W more steps under every backend (DIR/qwen3_{sdpa,flex,varlen}, `--model.attention` on resume) and one
# backend a second time (DIR/qwen3_<BACKEND>_repeat): the repeat's spread is the floor of the tolerances. Starting
# from one checkpoint, a wrong backend shows in the first steps, before trajectories drift apart. eval_matrix.py
# evaluates the start checkpoint under every backend (same weights) and joins the verdict.
# --from-scratch instead trains the configs for their own steps (a dynamics check; a fixed layout mistake is
# invisible there, docs/compare.md).
#
# --out DIR            the proof's folder (default outputs/backends-<date>): runs, compare.png, compare.json,
#                      compare.txt, eval_matrix.json; its name is the W&B group
# --nproc N            processes per run (default: the GPUs nvidia-smi lists, else 1)
# --preset cpu         the debug model in fp32 on short rows: a proof in about a minute on 2 CPU cores
# --repeat BACKEND     the backend trained twice (default sdpa)
# --pretrain-steps P   steps before the warm start (default 200; 40 with --preset cpu)
# --steps W            steps after it (default 60; 30 with --preset cpu)
# Overrides after -- go to every run (the proof sets training.steps and the checkpointing itself).
# PYTHON selects the interpreter (default .venv/bin/python, else python3). Ctrl-C or TERM stops the runs it started.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
caller=$PWD  # a relative --out is the caller's, not the repository's (the script works from the repository root)
cd "$(dirname "$0")/.."
. scripts/python.sh  # sets $python
out="outputs/backends-$(date +%Y%m%d-%H%M%S)"
nproc=""
repeat=sdpa
mode=warm
preset=""
pretrain_steps=""
steps=""
value() {  # the value of option $1, which must be there
  [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || { echo "train_backends.sh: $1 needs a value" >&2; exit 2; }
}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) value "$@"; out=$(cd "$caller" && realpath -m -- "$2"); shift 2 ;;
    --nproc) value "$@"; nproc=$2; shift 2 ;;
    --repeat) value "$@"; repeat=$2; shift 2 ;;
    --preset) value "$@"; preset=$2; shift 2 ;;
    --pretrain-steps) value "$@"; pretrain_steps=$2; shift 2 ;;
    --steps) value "$@"; steps=$2; shift 2 ;;
    --from-scratch) mode=scratch; shift ;;
    --) shift; break ;;
    *) echo "train_backends.sh: unknown option $1; see --help" >&2; exit 2 ;;
  esac
done
overrides=("$@")
gpus=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)
[ -n "$nproc" ] || nproc=$(( gpus >= 1 ? gpus : 1 ))
positive() {  # option, value
  case "$2" in ''|*[!0-9]*|0) echo "train_backends.sh: $1 must be a positive integer, got '$2'" >&2; exit 2 ;; esac
}
positive --nproc "$nproc"
case "$repeat" in
  sdpa|flex|varlen) ;;
  *) echo "train_backends.sh: --repeat must name a backend (sdpa, flex or varlen), got '$repeat'" >&2; exit 2 ;;
esac
case "$preset" in
  "") pretrain_steps=${pretrain_steps:-200}; steps=${steps:-60} ;;
  cpu)  # the debug model: fp32, 2 rows of 128 tokens, an evaluation every 10 steps
    pretrain_steps=${pretrain_steps:-40}; steps=${steps:-30}
    overrides=(--model.flavor debug --training.dtype float32 --data.vocab_size 2048 --training.seq_len 128
               --training.local_batch_size 2 --optimizer.warmup_steps 5 --eval.interval 10 --eval.batches 1
               "${overrides[@]}") ;;
  *) echo "train_backends.sh: --preset must be cpu, got '$preset'" >&2; exit 2 ;;
esac
positive --pretrain-steps "$pretrain_steps"
positive --steps "$steps"
if [ "$gpus" -eq 0 ] && [ -z "$preset" ] && [[ " ${overrides[*]} " != *" --model.flavor debug "* ]]; then
  echo "train_backends.sh: no GPU here: configs/qwen3_*.toml (small flavor, 8 rows of 2048 tokens, bf16) would take" \
       "hours on this CPU; Ctrl-C and pass --preset cpu (the debug model, minutes)" >&2
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
  echo "train_backends.sh: --out $out is not empty; choose a new folder" >&2; exit 2
fi
mkdir -p "$out"
group=$(basename "$out")

child=""  # the run in progress: each runs in the background so that a signal reaches this script's trap at once
stop() {
  trap - INT TERM
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null || true  # torchrun passes it on; train.py checkpoints and exits
    wait "$child" 2>/dev/null || true
  fi
  echo "train_backends.sh: stopped; the runs so far are in $out" >&2
  exit 130
}
trap stop INT TERM
run() {
  "$@" &
  child=$!
  local status=0
  wait "$child" || status=$?
  child=""
  return "$status"
}
launch=("$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" train.py)
[ "$nproc" -gt 1 ] || launch=("$python" train.py)  # one process needs no torchrun (and starts in half the time)
train() {  # config backend, run folder, train.py arguments...
  echo "== $1 -> $2"
  run "${launch[@]}" \
    --config "configs/qwen3_$1.toml" --job.output_dir "$2" --job.name "$(basename "$2")" \
    --metrics.wandb_group "$group" \
    "${overrides[@]}" "${@:3}"
}

runs=()
for backend in sdpa flex varlen "$repeat"; do
  name=qwen3_$backend
  [ ${#runs[@]} -lt 3 ] || name=qwen3_${backend}_repeat
  runs+=("$out/$name")
done
matrix=()
if [ "$mode" = warm ]; then
  train sdpa "$out/start" --training.steps "$pretrain_steps" --checkpoint.enable true --checkpoint.interval 0
  echo "== eval_matrix: the start checkpoint under every backend"
  # its verdict joins compare_runs.py's through the JSON
  run "$python" scripts/eval_matrix.py "$out/start" --json "$out/eval_matrix.json" > >(tee "$out/eval_matrix.md") ||
    true
  matrix=(--eval-matrix "$out/eval_matrix.json")
  total=$((pretrain_steps + steps))
  for run_dir in "${runs[@]}"; do
    backend=$(basename "$run_dir"); backend=${backend#qwen3_}; backend=${backend%_repeat}
    mkdir -p "$run_dir"
    cp "$out/start/config.toml" "$run_dir/"  # not its wandb_run_id: each continuation is its own W&B run
    cp -r "$out/start/checkpoints" "$run_dir/"
    train "$backend" "$run_dir" --model.attention "$backend" --training.steps "$total" --checkpoint.enable false
  done
else
  for run_dir in "${runs[@]}"; do
    backend=$(basename "$run_dir"); backend=${backend#qwen3_}; backend=${backend%_repeat}
    train "$backend" "$run_dir"
  done
fi
status=0  # a pipe would run compare_runs.py in a subshell, out of the trap's reach: tee through a substitution
run "$python" scripts/compare_runs.py "${runs[@]}" "${matrix[@]}" --png "$out/compare.png" --json "$out/compare.json" \
  --wandb > >(tee "$out/compare.txt") || status=$?
echo
echo "next: $python scripts/compare_runs.py $out/{$(IFS=,; echo "${runs[*]##*/}")} --png compare.png"
[ "$mode" = scratch ] || echo "      $python scripts/eval_matrix.py $out/start --mutation"
exit "$status"
