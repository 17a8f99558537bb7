#!/usr/bin/env bash
# Makes a virtual environment with torch and this package.
#   bash scripts/install.sh          # .venv for training (torch 2.11.0, what the GPU fleet runs)
#   bash scripts/install.sh --test   # also pytest, transformers, and SLURM + munge (apt) for tests/process/slurm
# VENV=path and TORCH_VERSION=x.y.z choose another folder or torch release (e.g. the one matching your CUDA).
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
torch_version=${TORCH_VERSION:-2.11.0}
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || python3 -m venv --clear "$venv"  # also mends a half-made one
"$venv/bin/python" -m pip install -q "torch==$torch_version" -e ".$extras" 2> >(grep -v "WARNING: Location" >&2)
if [ -n "$extras" ]; then bash .ci/slurm-setup.sh; fi
"$venv/bin/python" -c "import torch, recipes; print('installed: torch', torch.__version__, 'in $venv')"
