"""A run's identity: :func:`run_hash`, a stable hash of its resolved spec.

Result folders are named by it (``runs/<hash>``) and resumption finds finished runs by it, so it
must never change for a stored run: fields that do not change results are left out
(:data:`NON_IDENTITY_FIELDS`), and so are fields added later while they keep their default
(:data:`LATER_FIELD_DEFAULTS`, :data:`LATER_SUBFIELD_DEFAULTS`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qlrlab.engine.models import RunSpec

__all__ = ["LATER_FIELD_DEFAULTS", "LATER_SUBFIELD_DEFAULTS", "NON_IDENTITY_FIELDS", "run_hash"]

#: Fields of a run that do not change its results, hence are not part of its identity.
NON_IDENTITY_FIELDS = frozenset({"name", "output_dir", "checkpoint_every", "tensorboard"})

#: run fields added after runs were first stored: left out of the identity at their default, so
#: that earlier result directories keep their run hashes
LATER_FIELD_DEFAULTS: dict[str, Any] = {"nan_padding": False}
#: the same for fields of nested specs: ``(field, subfield) -> default``
LATER_SUBFIELD_DEFAULTS: dict[tuple[str, str], Any] = {("eval", "every_seconds"): None}


def run_hash(spec: RunSpec) -> str:
    """A stable 16-hex-digit identity of a run: a hash of its resolved spec without its label,
    output directory and checkpoint cadence (and without fields added later while they keep
    their default)."""
    exclude = set(NON_IDENTITY_FIELDS)
    exclude.update(k for k, v in LATER_FIELD_DEFAULTS.items() if getattr(spec, k) == v)
    data = spec.model_dump(mode="json", exclude=exclude)
    for (field, sub), default in LATER_SUBFIELD_DEFAULTS.items():
        if field in data and getattr(getattr(spec, field), sub) == default:
            data[field].pop(sub, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
