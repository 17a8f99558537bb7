#!/bin/bash
# Trains configs/qwen3_{sdpa,flex,varlen}.toml as one SLURM job array (task i = backend i), then compares
# their loss curves in a job that starts only once all three tasks succeed (--dependency=afterok).
#
#   slurm/submit_backends.sh [sbatch options] [-- --section.key value ...]
#
# The sbatch options (partition, account, time, nodes, GPUs...) go to both jobs; the comparison runs on one
# node. The overrides after -- go to every train.py. The three runs share one W&B group and one folder:
#   RUN_GROUP  W&B group and folder name (default: qwen3-backends-<date>-<time>)
#   RUNS_DIR   parent folder of the group's folder, relative to the repository root (default: outputs)
# The runs land in $RUNS_DIR/$RUN_GROUP/qwen3_{sdpa,flex,varlen}; the SLURM logs and the comparison plot
# beside them.
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
configs=()
runs=()
for backend in sdpa flex varlen; do
    configs+=("configs/qwen3_$backend.toml")
    runs+=("$group_dir/qwen3_$backend")
done

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
# Without --kill-on-invalid-dep a failed backend would leave the comparison pending forever.
compare_job=$(sbatch --parsable --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
    --output="$group_dir/%x-%j.log" \
    "${sbatch_options[@]}" --nodes=1 --ntasks=1 slurm/compare.sbatch "${runs[@]}")
compare_job=${compare_job%%;*}

echo "group:      $group ($group_dir)"
echo "training:   job array $array_job (logs: $group_dir/qwen3-backends-${array_job}_{0,1,2}.log)"
echo "comparison: job $compare_job, once all of $array_job succeed (log: $group_dir/qwen3-compare-$compare_job.log)"
