"""Deliberate refusals of the libraries a run calls into, told apart from memprof's own errors (torch side).

A refusal is a ``ValueError`` or ``NotImplementedError`` raised by an explicit ``raise`` statement in the code
of transformers, peft, bitsandbytes or accelerate: the library looked at the model and the method and said no
(peft's "Model does not support past key values which are required for prefix tuning."). It becomes a
``LibraryRefusalError`` naming the library, its installed version and its message. An ``ImportError`` raised in
a library's code (peft's LoftQ init needs scipy, AdaMSS scikit-learn) becomes a ``DependencyMissingError`` naming
the package to install, and an ``OSError`` a library raises while loading files (a tokenizer from an unreachable
hub) one line saying what could not be loaded. Anything else (a memprof bug, an error inside torch, a library
crashing on an unexpected input) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import re
import sys
from typing import Iterator

from ..compat import installed_version, refusal, run_description
from ..config import RunSetup
from ..errors import ConfigError, DependencyMissingError, MemprofError
from ..spec import ModelSpec

LIBRARY_PACKAGES = ("peft", "transformers", "bitsandbytes", "accelerate", "huggingface_hub")
# import name -> the name pip installs it by, where they differ
PIP_NAMES = {"sklearn": "scikit-learn", "cv2": "opencv-python", "PIL": "pillow", "yaml": "pyyaml"}


def _library_of(filename: str) -> str | None:
    for name in LIBRARY_PACKAGES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path and filename.startswith(os.path.dirname(path) + os.sep):
            return name
    return None


def _raised_in_library(exc: BaseException) -> tuple[str, str] | None:
    """(library, the line that raised) when the innermost frame of ``exc`` is in one of LIBRARY_PACKAGES."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    library = _library_of(filename)
    return None if library is None else (library, linecache.getline(filename, tb.tb_lineno).strip())


def missing_package(exc: ImportError, what: str) -> DependencyMissingError | None:
    """The DependencyMissingError an ImportError raised in a library's code stands for (an optional package the
    chosen options need), or None when the import failed elsewhere."""
    raised = _raised_in_library(exc)
    if raised is None:
        return None
    library, _ = raised
    reason = " ".join(str(exc).split())
    quoted = re.search(r"['\"`]([A-Za-z0-9_.\-]+)['\"`]", reason) or re.match(r"([A-Za-z0-9_.\-]+) is required", reason)
    name = getattr(exc, "name", None) or (quoted.group(1) if quoted else None)
    package = PIP_NAMES.get(name.split(".")[0], name.split(".")[0]) if name else None
    install = f"; pip install {package}" if package else ""
    return DependencyMissingError(f"{what} needs a package that is not installed ({library} "
                                  f"{installed_version(library) or '?'}: {reason[:200]}){install}")


def refusal_from(exc: BaseException, what: str) -> MemprofError | None:
    """The one-line error ``exc`` stands for (a LibraryRefusalError for a deliberate refusal, a
    DependencyMissingError for a missing optional package, a ConfigError for files a library could not load), or
    None when it is not one of those."""
    if isinstance(exc, MemprofError):
        return None
    if isinstance(exc, ImportError):
        return missing_package(exc, what)
    raised = _raised_in_library(exc)
    if raised is None or not raised[1].startswith("raise"):
        return None
    library, _ = raised
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError):
        return ConfigError(f"{library} {installed_version(library) or '?'} could not load what {what} needs: "
                           f"{reason[:300]}")
    if not isinstance(exc, (ValueError, NotImplementedError)):
        return None
    return refusal(library, installed_version(library), reason, what=what)


@contextlib.contextmanager
def library_refusals(what: str) -> Iterator[None]:
    """Turn a library's deliberate refusal, missing optional package or failed load raised inside the block into
    one memprof error about ``what`` (``refusal_from``)."""
    try:
        yield
    except (ValueError, NotImplementedError, ImportError, OSError) as exc:
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
