"""Device-facing probes behind one small interface: environment provenance, CUDA allocator counters, NVML
(process memory, energy), a step timer and the process's peak RSS.

CUDA readers raise ``DeviceUnavailableError`` on a machine without CUDA (as torchtune's ``get_memory_stats``
does); NVML readers return None when NVML or the device is unavailable, since NVML numbers are context only.
The CUDA and NVML code paths follow the documented APIs (``torch.cuda``, ``pynvml`` from nvidia-ml-py) and
are exercised only by the GPU test tier.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .. import __version__
from ..errors import DeviceUnavailableError
from ..records import EnvInfo


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def require_cuda() -> None:
    """Raise DeviceUnavailableError unless torch can use a CUDA device."""
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "CUDA is not available (torch " + torch.__version__ + " sees no GPU); run on a GPU machine or use --device cpu"
        )


def env_info(device: str) -> EnvInfo:
    """Where a measurement runs: library versions, device name and memory, CUDA/driver versions, CPU threads.

    Args:
        device: "cuda" or "cpu".

    Raises:
        DeviceUnavailableError: device "cuda" without CUDA.
    """
    if device == "cuda":
        require_cuda()
        index = torch.cuda.current_device()
        name: str | None = torch.cuda.get_device_name(index)
        total_bytes: int | None = int(torch.cuda.get_device_properties(index).total_memory)
        cuda_version = torch.version.cuda
        driver = nvml_driver_version()
    else:
        name, total_bytes, cuda_version, driver = _cpu_name(), _host_memory_bytes(), None, None
    return EnvInfo(
        memprof_version=__version__, python_version=platform.python_version(), torch_version=torch.__version__,
        transformers_version=_version("transformers"), peft_version=_version("peft"), device_name=name,
        device_total_memory_bytes=total_bytes, cuda_version=cuda_version, driver_version=driver,
        cpu_threads=torch.get_num_threads(), platform=platform.platform(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# ---- CUDA caching-allocator counters (raise on CPU) -------------------------------------------------------
def cuda_synchronize() -> None:
    require_cuda()
    torch.cuda.synchronize()


def cuda_reset_peak() -> None:
    """Start a clean peak window: wait for queued kernels, return cached blocks, reset the peak counters."""
    require_cuda()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def cuda_max_allocated_bytes() -> int:
    """Peak tensor bytes since the last reset (512-byte blocks), ``torch.cuda.max_memory_allocated``."""
    require_cuda()
    return int(torch.cuda.max_memory_allocated())


def cuda_max_reserved_bytes() -> int:
    """Peak bytes of allocator segments since the last reset, ``torch.cuda.max_memory_reserved``."""
    require_cuda()
    return int(torch.cuda.max_memory_reserved())


def cuda_allocated_bytes() -> int:
    """Tensor bytes allocated now, ``torch.cuda.memory_allocated``."""
    require_cuda()
    return int(torch.cuda.memory_allocated())


# ---- NVML (None when unavailable) ---------------------------------------------------------------------------
def _nvml_handle() -> Any:
    """The NVML handle of torch's current CUDA device, matched by PCI bus id (CUDA_VISIBLE_DEVICES-proof)."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        domain, bus, dev = (getattr(props, k, None) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
        if None not in (domain, bus, dev):
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0")
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except pynvml.NVMLError:
        return None


def nvml_driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # ImportError or NVMLError: no driver to report
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def nvml_process_used_bytes() -> int | None:
    """Device memory this process holds (what nvidia-smi shows for it: reserved + CUDA context).

    Falls back to the whole device's used memory when NVML cannot see our pid (containers with their own pid
    namespace, MIG) or reports no per-process number; None without NVML.
    """
    handle = _nvml_handle()
    if handle is None:
        return None
    import pynvml

    try:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None


def nvml_energy_mj() -> int | None:
    """Energy the device consumed since the driver loaded, in millijoules (Volta and newer); None without NVML."""
    handle = _nvml_handle()
    if handle is None:
        return None
    import pynvml

    try:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except pynvml.NVMLError:
        return None


# ---- timing and host memory ---------------------------------------------------------------------------------
@dataclass
class StepTimer:
    """Wall time per step. On CUDA the queue is drained before starting and before reading the clock, so a
    step's time covers its kernels and not the previous step's (nanoGPT and torchtune time the same way)."""

    device: str
    times_s: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times_s.append(time.perf_counter() - start)


def rss_peak_bytes() -> int:
    """Peak resident set size of this process over its whole life (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def virtual_memory_bytes() -> int | None:
    """The process's current address-space size (VmSize), Linux only; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())
