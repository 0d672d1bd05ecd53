"""blip2_fast.kernels: our kernels, functions only; nn.Modules live in the rest of blip2_fast.

Each op file holds its Triton kernels, launcher, autograd.Function and a plain-torch
reference; the entry points dispatch per call by the rule in `dispatch.py`.

Where the op files are. In the source tree they sit in the repository's top-level `kernels/`
folder, which has no `__init__.py` on purpose: as a top-level name it is then at most a
namespace portion, and Python always prefers a regular package called `kernels` (the PyPI
package that transformers imports) wherever that is on `sys.path`, even when the repository
root comes first (`python -m pytest`, `python -c` and notebooks put the current directory
there). This file is the package itself: in a source checkout or an editable install it adds
the top-level folder to its own `__path__`; a wheel install has the op files copied beside it
by setup.py, so the folder it adds is not there and nothing is added.
"""
import os as _os

_SOURCE_OPS = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "kernels")


def _is_source_checkout_ops(folder: str) -> bool:
    # Only the repository's own folder: next to our setup.py and holding our dispatch module.
    # In a wheel install the same relative path is site-packages/kernels, the PyPI package.
    root = _os.path.dirname(folder)
    return (_os.path.isfile(_os.path.join(root, "setup.py"))
            and _os.path.isfile(_os.path.join(folder, "dispatch.py"))
            and not _os.path.isfile(_os.path.join(folder, "__init__.py")))


if not _os.path.isfile(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "dispatch.py")) \
        and _is_source_checkout_ops(_SOURCE_OPS):
    __path__.append(_SOURCE_OPS)  # noqa: F821 (a package's __path__ exists while it runs)

from .dispatch import BackendRefused, clear_decisions, decisions, explain, forced_backend  # noqa: E402,F401
