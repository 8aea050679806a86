"""Moved to :mod:`qlrlab.backends.curvlinops_adapter`; this name is the same module (kept for imports
written against the old location)."""

import sys

from qlrlab.backends import curvlinops_adapter as _moved

sys.modules[__name__] = _moved
