# Sourced by the launch scripts: make sure .venv exists and holds ffc_parallel with its dependencies.
# FFC_TORCH_SPEC picks the torch build (default: the CPU build used for development and CI).
ffc_bootstrap() {
  local root venv stamp
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv"
  stamp="$venv/.ffc_installed"
  if [ ! -x "$venv/bin/python" ]; then
    echo "ffc_parallel: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ]; then
    echo "ffc_parallel: installing dependencies into $venv (about a minute)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${FFC_TORCH_SPEC:-torch==2.13.0}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]"
    touch "$stamp"
  fi
  export PATH="$venv/bin:$PATH"
}
