"""Device probes on CPU: provenance, the CPU fallbacks, and CUDA readers refusing without CUDA."""

from __future__ import annotations

import datetime
import time

import pytest
import torch

import memprof
from memprof.errors import DeviceUnavailableError
from memprof.runtime import probes

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


def test_env_info_cpu() -> None:
    env = probes.env_info("cpu")
    assert env.memprof_version == memprof.__version__
    assert env.torch_version == torch.__version__ and env.transformers_version and env.peft_version
    assert env.device_name and env.device_total_memory_bytes > 2**20
    assert env.cuda_version is None and env.driver_version is None
    assert env.cpu_threads == torch.get_num_threads() and env.platform
    assert datetime.datetime.fromisoformat(env.date).tzinfo is not None


@no_cuda
@pytest.mark.parametrize("reader", [probes.cuda_synchronize, probes.cuda_reset_peak, probes.cuda_max_allocated_bytes,
                                    probes.cuda_max_reserved_bytes, probes.cuda_allocated_bytes])
def test_cuda_readers_refuse_on_cpu(reader) -> None:  # noqa: ANN001
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        reader()


@no_cuda
def test_cuda_env_and_nvml_without_cuda() -> None:
    with pytest.raises(DeviceUnavailableError):
        probes.env_info("cuda")
    assert probes.nvml_process_used_bytes() is None
    assert probes.nvml_energy_mj() is None


def test_step_timer_and_rss() -> None:
    timer = probes.StepTimer("cpu")
    for _ in range(2):
        with timer.step():
            time.sleep(0.01)
    assert len(timer.times_s) == 2 and all(t >= 0.009 for t in timer.times_s)
    before = probes.rss_peak_bytes()
    block = torch.ones(64 * 2**20 // 4)  # touch 64 MiB
    assert probes.rss_peak_bytes() >= before and probes.rss_peak_bytes() > block.nbytes
    vm = probes.virtual_memory_bytes()
    assert vm is None or vm > block.nbytes
