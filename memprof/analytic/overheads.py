"""Device-level memory outside the tensors of the step: what turns a tensor peak into what the GPU shows (pure).

- allocated: tensor bytes (``torch.cuda.max_memory_allocated``) + the cuBLAS workspace the first matmul
  allocates and keeps (CUBLAS_WORKSPACE_CONFIG default, 8 MiB on Hopper-class and 4 MiB elsewhere per handle).
- reserved: allocated + caching-allocator slack (fragmentation and cached free blocks,
  ``max_memory_reserved``); modelled as a fraction of the peak, default 5%.
- device total: reserved + the CUDA context (driver, kernels, cuDNN/cuBLAS handles), what nvidia-smi shows;
  0.3-1.4 GiB depending on GPU, driver and libraries loaded, default 500 MiB.
All three are user-overridable (``Overheads``) because they depend on the machine, not on the model.
"""

from __future__ import annotations

from ..config import Device, RunSetup
from ..records import DeviceTotals


def cublas_workspace_bytes(setup: RunSetup) -> int:
    return setup.overheads.cublas_workspace_bytes if setup.device is Device.cuda else 0


def allocator_reserve_bytes(peak_bytes: int, setup: RunSetup) -> int:
    if setup.device is not Device.cuda:
        return 0
    return round(peak_bytes * setup.overheads.allocator_reserve_frac)


def cuda_context_bytes(setup: RunSetup) -> int:
    return setup.overheads.cuda_context_bytes if setup.device is Device.cuda else 0


def device_totals(peak_tensor_bytes: int, setup: RunSetup) -> DeviceTotals:
    """Allocated, reserved and device-total predictions from the tensor peak."""
    allocated = peak_tensor_bytes + cublas_workspace_bytes(setup)
    reserved = allocated + allocator_reserve_bytes(allocated, setup)
    return DeviceTotals(allocated, reserved, reserved + cuda_context_bytes(setup))
