"""One training step, phase by phase, shared by the measurement harness and the traced estimator.

forward (under autocast for the AMP regime) -> backward, once per micro-batch -> optimizer step -> zero_grad,
as the loop in the RunSetup runs them (a plain torch loop, or transformers' Trainer: see ``run_step``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import Loop, Regime, RunSetup, ZeroGrad
from ..records import Category, Phase
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
             scaler: Any = None, held: list[Any] | None = None,
             after_step: Callable[[], None] | None = None) -> float | None:
    """Run one optimizer step of the loop ``setup`` describes. With a tracker, each phase is labelled and
    categories are marked.

    ``setup.grad_accum`` micro-batches each run forward and backward (the Trainer divides each loss by K; the
    gradients of later micro-batches accumulate into .grad), then the optimizer steps (the Trainer clips the
    gradient norm to 1.0 first, its default max_grad_norm) and the gradients are zeroed: set to None, or in place
    with ``zero_grad=zeros``. The model output is dropped right after the forward (as the Trainer's compute_loss
    does) unless ``keep_outputs``: then ``held`` keeps it until the next forward returns, as a loop that binds
    ``outputs = model(**batch)`` does.

    Returns:
        the last micro-batch's loss as a float when it can be read (real tensors), else None.
    """
    phase = tracker.phase if tracker is not None else (lambda _p: contextlib.nullcontext())
    trainer = setup.loop is Loop.trainer
    k = setup.grad_accum
    held = held if held is not None else []
    value = None
    batches = [batch]
    if trainer and k > 1:  # Trainer.get_batch_samples fetches the step's K micro-batches before the first runs
        batches += [{name: t.clone() for name, t in batch.items()} for _ in range(k - 1)]
        if tracker is not None:
            tracker.register((t for b in batches[1:] for t in b.values()), Category.inputs)
    for micro in range(k):
        with phase(Phase.forward):
            with autocast_region(setup, device_type, emulation):
                outputs = model(**batches[micro if len(batches) > 1 else 0])
            loss = outputs.loss
            if setup.keep_outputs:
                held[:] = [outputs]  # the previous step's output is released only now
            del outputs
        if trainer and k > 1:
            loss = loss / k
        if tracker is not None:
            tracker.mark_activations()
        with phase(Phase.backward):
            if tracker is not None:
                tracker.set_phase(BACKWARD_HEAD)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if tracker is not None:
            tracker.mark_gradients(model)
        if not getattr(loss, "fake_mode", None) and loss.device.type != "meta":
            value = float(loss.detach())
        del loss
    with phase(Phase.optimizer):
        if trainer:  # Trainer: max_grad_norm=1.0 -> accelerator.clip_grad_norm_ before optimizer.step()
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    if tracker is not None:
        tracker.mark_optimizer(optimizer)
    if after_step is not None:
        after_step()  # gradients still alive: what "memory after optimizer.step()" benchmarks read
    optimizer.zero_grad(set_to_none=setup.zero_grad is ZeroGrad.none)
    del batches
    return value
