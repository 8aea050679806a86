"""Moved to :mod:`qlrlab.backends.fastpath`; this name is the same module (kept for imports
written against the old location)."""

import sys

from qlrlab.backends import fastpath as _moved

sys.modules[__name__] = _moved
