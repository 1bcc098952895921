"""Typed errors. The core raises these; only the CLI turns them into a message and an exit code."""

from __future__ import annotations


class MemprofError(Exception):
    """Base class for every error caused by user input or the environment, not by a memprof bug."""


class ConfigError(MemprofError, ValueError):
    """A run option, a config file or a combination of options is invalid."""


class UnsupportedModelError(MemprofError):
    """A model name, config or architecture memprof cannot describe."""


class DeviceUnavailableError(MemprofError):
    """The requested device (CUDA, NVML) is not available on this machine."""


class DependencyMissingError(MemprofError):
    """An optional dependency (the torch stack, matplotlib) is needed but not installed."""


class LibraryRefusalError(MemprofError):
    """The installed transformers / peft / bitsandbytes refuse this method on this model (a deliberate refusal
    in their code, not a memprof error): the run cannot happen with these versions. ``compat.refusal`` words it."""

    def __init__(self, message: str, library: str | None = None, version: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.library, self.version, self.reason = library, version, reason
