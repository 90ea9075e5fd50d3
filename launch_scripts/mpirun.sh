#!/usr/bin/env bash
# Plain mpirun (Open MPI), NP processes; ffc_parallel.init_distributed agrees on rank 0's address
# through mpi4py and exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* before DeepSpeed starts.
#   NP=8 launch_scripts/mpirun.sh --deepspeed_config deepspeed_configs/zero1_fp32.json ...
# MPIRUN_ARGS adds launcher options (e.g. "--hostfile hosts").
set -euo pipefail
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-$(dirname "$(command -v "$PYTHON")")/mpirun}
[[ -x "$MPIRUN" ]] || MPIRUN=mpirun
# shellcheck disable=SC2086
exec "$MPIRUN" -np "${NP:-2}" --oversubscribe -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ${MPIRUN_ARGS:-} \
  "$PYTHON" -m "${FFC_ENTRY:-ffc_parallel.cli.train}" "$@"
