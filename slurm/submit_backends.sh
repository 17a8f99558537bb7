#!/bin/bash
# Trains configs/qwen3_{sdpa,flex,varlen}.toml as one SLURM job array (task i = backend i) and sdpa a second time
# (the repeat, whose spread calibrates the tolerances), then compares their loss curves in a job that starts only
# once all of them succeed (--dependency=afterok).
#
#   slurm/submit_backends.sh [sbatch options] [-- --section.key value ...]
#
# The sbatch options (partition, account, time, nodes, GPUs...) go to every job; the comparison runs on one
# node. The overrides after -- go to every train.py. The runs share one W&B group and one folder:
#   RUN_GROUP  W&B group and folder name (default: qwen3-backends-<date>-<time>)
#   RUNS_DIR   parent folder of the group's folder, relative to the repository root (default: outputs)
#   REPEAT     the backend trained twice (default: sdpa)
# The runs land in $RUNS_DIR/$RUN_GROUP/qwen3_{sdpa,flex,varlen,<REPEAT>_repeat}; the SLURM logs, compare.png,
# compare.json and the comparison log (the verdict) beside them. These runs start from scratch (a dynamics check);
# scripts/train_backends.sh on one node runs the warm-start proof (docs/compare.md).
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail

cd "$(dirname "$0")/.."  # the jobs' submit dir must be the repository root

sbatch_options=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    sbatch_options+=("$1")
    shift
done
if [ $# -gt 0 ]; then
    shift
fi
overrides=("$@")

group=${RUN_GROUP:-qwen3-backends-$(date +%Y%m%d-%H%M%S)}
group_dir=${RUNS_DIR:-outputs}/$group
repeat=${REPEAT:-sdpa}
case "$repeat" in
    sdpa|flex|varlen) ;;
    *) echo "submit_backends.sh: REPEAT must name a backend (sdpa, flex or varlen), got '$repeat'" >&2; exit 2 ;;
esac
configs=()
runs=()
for backend in sdpa flex varlen; do
    configs+=("configs/qwen3_$backend.toml")
    runs+=("$group_dir/qwen3_$backend")
done
runs+=("$group_dir/qwen3_${repeat}_repeat")

created=""
[ -d "$group_dir" ] || created=yes
mkdir -p "$group_dir"
# --parsable prints "jobid" or "jobid;cluster". If sbatch refuses, the folder made for it goes again.
if ! array_job=$(sbatch --parsable --job-name=qwen3-backends --array=0-$((${#configs[@]} - 1)) \
    --output="$group_dir/%x-%A_%a.log" "${sbatch_options[@]}" \
    slurm/train.sbatch "${configs[@]}" --job.output_dir "$group_dir/{config}" --metrics.wandb_group "$group" \
    "${overrides[@]}"); then
    [ -z "$created" ] || rmdir "$group_dir" 2>/dev/null || true
    echo "submit_backends.sh: sbatch refused the training array (its message is above); nothing was submitted" >&2
    exit 1
fi
array_job=${array_job%%;*}
repeat_job=$(sbatch --parsable --job-name=qwen3-repeat --output="$group_dir/%x-%j.log" "${sbatch_options[@]}" \
    slurm/train.sbatch "configs/qwen3_$repeat.toml" --job.output_dir "$group_dir/qwen3_${repeat}_repeat" \
    --job.name "qwen3_${repeat}_repeat" --metrics.wandb_group "$group" "${overrides[@]}")
repeat_job=${repeat_job%%;*}
# Without --kill-on-invalid-dep a failed backend would leave the comparison pending forever.
compare_job=$(sbatch --parsable --dependency="afterok:$array_job:$repeat_job" --kill-on-invalid-dep=yes \
    --output="$group_dir/%x-%j.log" \
    "${sbatch_options[@]}" --nodes=1 --ntasks=1 slurm/compare.sbatch "${runs[@]}" \
    --png "$group_dir/compare.png" --json "$group_dir/compare.json" --wandb)
compare_job=${compare_job%%;*}

echo "group:      $group ($group_dir)"
echo "training:   job array $array_job (logs: $group_dir/qwen3-backends-${array_job}_{0,1,2}.log)"
echo "repeat:     job $repeat_job, $repeat again (log: $group_dir/qwen3-repeat-$repeat_job.log)"
echo "comparison: job $compare_job, once all of them succeed (log: $group_dir/qwen3-compare-$compare_job.log;" \
     "compare.png, compare.json beside it)"
