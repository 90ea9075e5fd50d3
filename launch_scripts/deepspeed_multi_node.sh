#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher over Open MPI. HOSTFILE lists "host slots=N" lines;
# MASTER_ADDR defaults to the first host. DeepSpeed checks passwordless ssh to every host unless
# NO_SSH_CHECK=1 (needed for a localhost-only hostfile).
#   HOSTFILE=hosts launch_scripts/deepspeed_multi_node.sh --deepspeed_config deepspeed_configs/zero2_bf16.json ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_job.sh"
PYTHON=${PYTHON:-python}
HOSTFILE=${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: "hostname slots=N")}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
DEEPSPEED=${DEEPSPEED:-$(dirname "$(command -v "$PYTHON")")/deepspeed}
[[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
extra=()
[[ "${NO_SSH_CHECK:-0}" == 1 ]] && extra+=(--no_ssh_check)
ffc_run_job "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher openmpi "${extra[@]}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module "${FFC_ENTRY:-ffc_parallel.cli.train}" "$@"
