#!/usr/bin/env bash
# One node, one process per GPU (or NUM_GPUS CPU processes), through the DeepSpeed launcher.
#   NUM_GPUS=8 launch_scripts/deepspeed_single_node.sh --deepspeed_config deepspeed_configs/zero1_fp16.json ...
# Arguments go to the training entry point (FFC_ENTRY, default ffc_parallel.cli.train).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_job.sh"
PYTHON=${PYTHON:-python}
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
DEEPSPEED=${DEEPSPEED:-$(dirname "$(command -v "$PYTHON")")/deepspeed}
[[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
ffc_run_job "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module "${FFC_ENTRY:-ffc_parallel.cli.train}" "$@"
