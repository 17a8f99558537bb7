#!/usr/bin/env bash
# Installs what tests/process/slurm needs: SLURM 22.05 (Debian bookworm's slurm-wlm) and munge.
# Package scripts do not start the daemons (policy-rc.d forbids it in containers); the tests start
# private ones with their own config, key and sockets, so nothing here configures or starts a service.
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && command -v mungekey >/dev/null; then
    echo "slurm-setup: slurm-wlm and munge already installed"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends slurm-wlm munge
