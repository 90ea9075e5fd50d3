# Sourced by the launch scripts: make sure a virtual environment holds ffc_parallel with its dependencies.
#   ffc_bootstrap [VENV [DEEPSPEED_SPEC]]   default .venv and the newest DeepSpeed setup.cfg allows;
#   e.g. ffc_bootstrap .venv-deepspeed-oldest deepspeed==0.16.0 for CI's oldest-DeepSpeed run.
# FFC_TORCH_SPEC picks the torch build (default: the CPU build used for development and CI).
ffc_bootstrap() {
  local root venv spec stamp
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/${1:-.venv}"
  spec="${2:-}"
  stamp="$venv/.ffc_installed"
  if [ ! -x "$venv/bin/python" ]; then
    echo "ffc_parallel: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$spec" ]; then
    echo "ffc_parallel: installing dependencies into $venv ${spec:+($spec) }(about a minute)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${FFC_TORCH_SPEC:-torch==2.13.0}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]" ${spec:+"$spec"}
    echo "$spec" > "$stamp"
  fi
  export PATH="$venv/bin:$PATH"
}
