"""Output paths checked before any work starts (issue 10): a results file, a record folder or a plot that cannot
be written is one line up front, not a traceback after an hour of measuring. Checking creates nothing: the
writers create the missing folders when they first write. No torch import here."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """``path`` (a file, or with ``folder`` a directory) could be created or appended to, without creating it.

    Raises:
        ConfigError: a component of the path is a file, the path is the wrong kind, its nearest existing folder is
            not writable, the file system refuses the file, or the name is too long.
    """
    path = Path(path).expanduser()
    try:
        if path.exists():
            if path.is_dir() != folder:
                raise ConfigError(f"{what} {path} is {'a file' if folder else 'a directory'}; give "
                                  f"{'a folder' if folder else 'a file path'}")
            if not os.access(path, os.W_OK):
                raise ConfigError(f"{what} {path} is not writable")
            return path
        first_missing = path
        while not first_missing.parent.exists():
            first_missing = first_missing.parent
        ancestor = first_missing.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{what} {path}: {ancestor} exists and is not a folder")
        if not os.access(ancestor, os.W_OK):
            raise ConfigError(f"{what} {path} cannot be created: {ancestor} is not writable")
        # the file system may still refuse (/proc, read-only mounts): create the first missing part, remove it
        if first_missing == path and not folder:
            with open(path, "ab"):
                pass
            path.unlink()
        else:
            first_missing.mkdir()
            first_missing.rmdir()
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be written: {exc.strerror or type(exc).__name__}") from None
    return path


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls (ESC, BEL, CR, ...); keeps \t and \n


def printable(value: Any) -> Any:
    """``value`` with every control character in its strings shown as ``\\xNN``: a model name or a record read
    from a file can never move the cursor, retitle the terminal or hide text when memprof prints it."""
    if isinstance(value, str):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    return value
