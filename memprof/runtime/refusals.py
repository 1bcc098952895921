"""Deliberate refusals of the libraries a run calls into, told apart from memprof's own errors (torch side).

A refusal is a ``ValueError`` or ``NotImplementedError`` raised by an explicit ``raise`` statement in the code
of transformers, peft, bitsandbytes or accelerate: the library looked at the model and the method and said no
(peft's "Model does not support past key values which are required for prefix tuning."). It becomes a
``LibraryRefusalError`` naming the library, its installed version and its message. Anything else (a memprof
bug, an error inside torch, a library crashing on an unexpected input) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
from typing import Iterator

from ..compat import installed_version, refusal, run_description
from ..config import RunSetup
from ..errors import LibraryRefusalError, MemprofError
from ..spec import ModelSpec

LIBRARY_PACKAGES = ("peft", "transformers", "bitsandbytes", "accelerate")


def _library_of(filename: str) -> str | None:
    for name in LIBRARY_PACKAGES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path and filename.startswith(os.path.dirname(path) + os.sep):
            return name
    return None


def refusal_from(exc: BaseException, what: str) -> LibraryRefusalError | None:
    """The LibraryRefusalError ``exc`` stands for, or None when it is not a library's deliberate refusal."""
    if isinstance(exc, MemprofError) or not isinstance(exc, (ValueError, NotImplementedError)):
        return None
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    library = _library_of(filename)
    if library is None or not linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise"):
        return None
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return refusal(library, installed_version(library), reason, what=what)


@contextlib.contextmanager
def library_refusals(what: str) -> Iterator[None]:
    """Turn a library's deliberate refusal raised inside the block into a LibraryRefusalError about ``what``."""
    try:
        yield
    except (ValueError, NotImplementedError) as exc:
        error = refusal_from(exc, what)
        if error is None:
            raise
        raise error from None


def what_runs(spec: ModelSpec, setup: RunSetup, peft_config: object = None) -> str:
    """What a refusal refuses: the method, or the peft config's type when one is applied as given."""
    if peft_config is None:
        return run_description(spec, setup)
    kind = getattr(getattr(peft_config, "peft_type", None), "value", None) or type(peft_config).__name__
    return f"a {kind} peft config on {spec.name} ({spec.task.value})"
