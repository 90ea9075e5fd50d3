#!/usr/bin/env bash
# First contact: trains a small face-recognition-style model with the class-sharded head on 2 ranks
# (DeepSpeed launcher) on the built-in synthetic long-tailed data (10,000 identities), then evaluates it.
# A fresh machine gets .venv first. Measured on 2 CPU cores: 2.5 minutes (about 6 while other jobs
# loaded the cores). Results: runs/quickstart/.
# Extra arguments go to ffc-train (e.g. launch_scripts/quickstart.sh --epochs 4 --sample-rate 0.1);
# FFC_RANKS sets the number of ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/_bootstrap.sh
source launch_scripts/_job.sh
ffc_bootstrap
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per rank: the ranks share the cores
port="$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
ffc_run_job deepspeed --num_gpus "${FFC_RANKS:-2}" --master_port "$port" --module ffc_parallel.cli.train \
  --epochs 2 --eval-before --output-dir runs/quickstart "$@"
