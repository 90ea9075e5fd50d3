"""``ffc-bench``: the head's benchmark (``benchmarks/head_bench.py``) from a source checkout.

The benchmark code lives in the repository's ``benchmarks/`` package, next to its results; this
entry point finds it through the (editable) install of ``ffc_parallel`` and runs it. Arguments are
those of ``python -m benchmarks.head_bench`` (``ffc-bench --help``).
"""
from __future__ import annotations

import sys
from pathlib import Path


def _repo_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "head_bench.py").exists():
        raise SystemExit("ffc-bench needs a source checkout of ffc_parallel (benchmarks/ is not installed "
                         "with the package): git clone the repository and `pip install -e .` from it")
    return root


def main(argv=None) -> int:
    root = str(_repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)  # the rank processes inherit sys.path through PYTHONPATH
    from benchmarks.head_bench import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
