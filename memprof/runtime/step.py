"""One training step, phase by phase, shared by the measurement harness and the traced estimator.

forward (under autocast for the AMP regime) -> backward -> optimizer step -> zero_grad(set_to_none=True).
The model output is dropped right after the forward (as HF Trainer's compute_loss does), so logits live only
as long as autograd needs them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import Regime, RunSetup
from ..records import Phase
from .build import TORCH_DTYPE
from .emulate import CudaAutocast, CudaEmulation
from .tracker import MemoryTracker

BACKWARD_HEAD = "backward.head"   # from the loss down to the last block's output
BACKWARD_TAIL = "backward.tail"   # below the first block (embeddings)


def backward_layer_phase(index: int) -> str:
    return f"backward.layer.{index}"


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the longest ModuleList), in forward order."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    return list(best) if best is not None else []


@contextlib.contextmanager
def backward_markers(model: nn.Module, tracker: MemoryTracker) -> Iterator[None]:
    """Split the backward phase by block: when the gradient of block i's output is ready, block i's backward
    begins (tensor hooks on block outputs and on the first block's input)."""
    blocks = block_modules(model)
    handles = []

    def mark(phase: str) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            tracker.set_phase(phase)
        return hook

    def first(x: Any) -> torch.Tensor | None:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
            return x[0]
        return getattr(x, "hidden_states", None) if not isinstance(x, (tuple, list)) else None

    def on_output(index: int):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = first(output)
            if out is not None and out.requires_grad:
                out.register_hook(mark(backward_layer_phase(index)))
            if index == 0:
                inp = first(args) if args else first(kwargs.get("hidden_states"))
                if inp is not None and inp.requires_grad:
                    inp.register_hook(mark(BACKWARD_TAIL))
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(on_output(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def autocast_region(setup: RunSetup, device_type: str, emulation: CudaEmulation | None) -> contextlib.AbstractContextManager:
    """The forward's autocast context: real torch.autocast, or the emulated CUDA policy in a trace."""
    if setup.effective_regime is not Regime.amp:
        return contextlib.nullcontext()
    dtype = TORCH_DTYPE[setup.dtype]
    if emulation is not None:
        return _emulated_autocast(emulation, dtype)
    return torch.autocast(device_type=device_type, dtype=dtype)


@contextlib.contextmanager
def _emulated_autocast(emulation: CudaEmulation, dtype: torch.dtype) -> Iterator[None]:
    emulation.autocast = CudaAutocast(dtype)
    try:
        yield
    finally:
        emulation.autocast = None  # drops the cast cache, as leaving torch.autocast does


def run_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: Any, setup: RunSetup, device_type: str,
             tracker: MemoryTracker | None = None, emulation: CudaEmulation | None = None,
             scaler: Any = None) -> float | None:
    """Run one training step. With a tracker, each phase is labelled and categories are marked.

    Returns:
        the loss as a float when it can be read (real tensors), else None.
    """
    phase = tracker.phase if tracker is not None else (lambda _p: contextlib.nullcontext())
    with phase(Phase.forward):
        with autocast_region(setup, device_type, emulation):
            loss = model(**batch).loss
    if tracker is not None:
        tracker.mark_activations()
    with phase(Phase.backward):
        if tracker is not None:
            tracker.set_phase(BACKWARD_HEAD)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if tracker is not None:
        tracker.mark_gradients(model)
    value = None
    if not getattr(loss, "fake_mode", None) and loss.device.type != "meta":
        value = float(loss.detach())
    del loss
    with phase(Phase.optimizer):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    if tracker is not None:
        tracker.mark_optimizer(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return value
