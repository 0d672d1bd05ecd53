"""The range of transformers releases this package is tested against.

transformers is the reference our parity tests compare with and the source of the tokenizers
we load; its releases have changed BLIP-2 behaviour and argument names before (the model
forward's cache argument was renamed in 5.2x, generation semantics moved between 4.x and 5.0).
CI runs the parity tests on both ends of the range below; another release still works as far
as it goes, with one warning that names it.
"""
from __future__ import annotations

import importlib.metadata
import warnings

from packaging.version import InvalidVersion, Version

# (oldest, newest) release the parity tests pass on; setup.py's floor is the first
TESTED_TRANSFORMERS = ("5.1.0", "5.25.0")

_warned = False


def check_transformers(version: str | None = None) -> bool:
    """True when `version` (default: the installed transformers) lies in the tested range;
    otherwise warn once per process, naming the version and the range, and return False."""
    global _warned
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            return True  # nothing to check: loading will say it needs transformers if it does
    oldest, newest = TESTED_TRANSFORMERS
    try:
        # a pre-release of the next version (5.26.0.dev0) is past the newest tested release too
        inside = Version(oldest) <= Version(version) and Version(version).release <= Version(newest).release
    except InvalidVersion:
        inside = False
    if not inside and not _warned:
        _warned = True
        warnings.warn(f"transformers {version} is outside the range blip2_fast is tested with "
                      f"({oldest} to {newest}); results may differ from the tested ones", UserWarning,
                      stacklevel=2)
    return inside
