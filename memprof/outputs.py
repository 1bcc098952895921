"""Output paths checked before any work starts (issue 10): a results file, a record folder or a plot that cannot
be written is one line up front, not a traceback after an hour of measuring. No torch import here."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """``path`` (a file, or with ``folder`` a directory) can be created or appended to.

    The missing directories above it are created (as ``mkdir -p`` would); a component that exists as a file, a
    read-only or unreachable place, or a name too long for the file system is a ConfigError naming ``what``.
    """
    path = Path(path).expanduser()
    directory = path if folder else path.parent
    try:
        if path.exists() and path.is_dir() != folder:
            raise ConfigError(f"{what} {path} is {'a file' if folder else 'a directory'}; give "
                              f"{'a folder' if folder else 'a file path'}")
        directory.mkdir(parents=True, exist_ok=True)
    except ConfigError:
        raise
    except FileExistsError:
        raise ConfigError(f"{what} {path}: a part of the path exists and is not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be created: {exc.strerror or type(exc).__name__}") from None
    target = path if path.exists() else directory
    if not os.access(target, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    if not folder and not path.exists():  # the file system may still refuse (/proc, a full or read-only mount)
        try:
            with open(path, "ab"):
                pass
            path.unlink()
        except OSError as exc:
            raise ConfigError(f"{what} {path} cannot be written: {exc.strerror or type(exc).__name__}") from None
    return path
