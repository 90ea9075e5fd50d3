"""Moved to :mod:`ffc_parallel.evaluation` (``eval`` shadowed the builtin); this path goes in the next release."""
import warnings

from ..evaluation import *  # noqa: F401,F403
from ..evaluation import __all__  # noqa: F401

warnings.warn("ffc_parallel.eval moved to ffc_parallel.evaluation; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
