#!/usr/bin/env bash
# torchrun, NPROC processes on this node (NNODES/NODE_RANK/MASTER_ADDR for several nodes).
#   NPROC=8 launch_scripts/torchrun.sh --deepspeed_config deepspeed_configs/zero3_bf16.json ...
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m "${FFC_ENTRY:-ffc_parallel.cli.train}" "$@"
