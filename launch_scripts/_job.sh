# Sourced by the launch scripts: run a launcher command as one process group, so that SIGTERM or SIGINT
# to the script reaches the launcher, DeepSpeed's per-node launcher and every rank (DeepSpeed's runner
# does not forward them: its children went on as orphans). Ranks get FFC_STOP_GRACE seconds (default
# 10) to flush and exit, then the group is killed.
#   ffc_run_job deepspeed --num_gpus 2 --module ffc_parallel.cli.train ...
ffc_run_job() {
  setsid "$@" &
  FFC_JOB=$!
  trap 'ffc_stop_job TERM' TERM
  trap 'ffc_stop_job INT' INT
  local rc=0
  wait "$FFC_JOB" || rc=$?
  while kill -0 "$FFC_JOB" 2>/dev/null; do   # a trapped signal ended the first wait early
    rc=0
    wait "$FFC_JOB" || rc=$?
  done
  if [ -n "${FFC_KILLER:-}" ]; then   # stopping: the launcher is gone, wait for the rest of its group
    while kill -0 -- "-$FFC_JOB" 2>/dev/null; do sleep 0.5; done
    kill "$FFC_KILLER" 2>/dev/null || true
  fi
  return "$rc"
}

ffc_stop_job() {
  echo "ffc_parallel: SIG$1: stopping the job (process group $FFC_JOB)" >&2
  kill -"$1" -- "-$FFC_JOB" 2>/dev/null || true
  ( sleep "${FFC_STOP_GRACE:-10}"; kill -KILL -- "-$FFC_JOB" 2>/dev/null ) &
  FFC_KILLER=$!
}
