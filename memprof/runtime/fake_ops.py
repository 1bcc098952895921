"""Fake-tensor ops made to behave as the run's ops do, for the traced estimator (trace.trace_depth
enters all three): values for the batch's small integer tensors where an op's output shape depends on them
(``BatchValues``), matmuls of two dtypes refused as the real kernels refuse them (``MatmulDtypes``), and
``aten::_grouped_mm`` sized in every dtype the CPU kernel runs (``grouped_mm_in_any_dtype``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ConfigError

_UNKNOWN = object()  # a value _BatchValues could not compute
VALUE_NUMEL_LIMIT = 1 << 16  # integer / boolean tensors up to this size carry their values (ids, labels, masks)
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                     "__imod__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}


class BatchValues(TorchFunctionMode):
    """Values for the small integer and boolean tensors of a trace (token ids, labels, masks, positions), so that
    the ops whose output shape depends on values get the shape the run computes for memprof's batch.

    Each such tensor created on fake tensors from known values (none: ``torch.randint``, ``torch.arange``; or
    tensors already known) also gets a real CPU value, computed by the same call on the known values. An op whose
    fake output has no shape (``nonzero``: DeBERTa-v2's ``(labels >= 0).nonzero()``; ``unique_consecutive``: T5's
    check that each example holds as many <eos> as the others) then gets an uninitialised fake output of the real
    result's shape, allocated through the tracker like the run's own output; a boolean-mask index by a known mask
    (T5's ``sequence_output[eos_mask, :]``) indexes by the mask's nonzero positions, as aten::index does. Values
    of weights and activations stay unknown: an op that needs them still fails (trace._data_dependent_shapes)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.values = WeakIdKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        from torch._subclasses.fake_tensor import DynamicOutputShapeException, DataDependentOutputException

        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        known = all(t in self.values for t in tensors)
        if getattr(func, "__name__", "") == "__getitem__" and not known:
            args = (args[0], self._masks_as_positions(args[1]))
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            real = self._real(func, args, kwargs) if known and tensors else _UNKNOWN
            if real is _UNKNOWN:
                raise
            device = tensors[0].device
            out = tree_map(lambda r: self._fake_like(r, device) if isinstance(r, torch.Tensor) else r, real)
            self._remember(out, real)
            return out
        name = getattr(func, "__name__", "")
        in_place = name in _IN_PLACE_DUNDERS or "out" in kwargs or (name.endswith("_") and not name.startswith("_"))
        if in_place and tensors and tensors[0] in self.values:
            if not known:  # overwritten by values the trace does not know
                del self.values[tensors[0]]
            elif self._real(func, args, kwargs) is _UNKNOWN:  # writes the known value as the run writes its own
                del self.values[tensors[0]]
        elif known and self._worth_knowing(out):
            real = self._real(func, args, kwargs)
            if real is not _UNKNOWN:
                self._remember(out, real)
        return out

    @staticmethod
    def _worth_knowing(out: Any) -> bool:
        return (isinstance(out, torch.Tensor) and type(out).__name__ == "FakeTensor"
                and (out.dtype == torch.bool or not (out.is_floating_point() or out.is_complex()))
                and out.numel() <= VALUE_NUMEL_LIMIT)

    def _real(self, func, args: tuple, kwargs: dict) -> Any:  # noqa: ANN001
        """``func`` on the known values, on the CPU and outside every mode; _UNKNOWN when it cannot run there."""
        from torch.utils._python_dispatch import _disable_current_modes

        real_args, real_kwargs = tree_map(lambda t: self.values[t] if isinstance(t, torch.Tensor) else t,
                                          (args, kwargs))
        try:
            with torch._C.DisableTorchFunction(), _disable_current_modes():
                return func(*real_args, **real_kwargs)
        except Exception:  # noqa: BLE001 - a device or an op the CPU lacks: the value stays unknown
            return _UNKNOWN

    def _remember(self, out: Any, real: Any) -> None:
        fakes, _ = tree_flatten(out)
        reals, _ = tree_flatten(real)
        if len(fakes) == len(reals):
            for f, r in zip(fakes, reals):
                if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor) and f.shape == r.shape:
                    self.values[f] = r

    @staticmethod
    def _fake_like(real: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=device)

    def _masks_as_positions(self, index: Any) -> Any:
        """A boolean mask the trace knows becomes the index tensors of its nonzero positions (aten::index turns a
        mask into ``mask.nonzero()``'s columns itself: same result, same shape)."""
        items = index if isinstance(index, tuple) else (index,)
        if not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i in self.values for i in items):
            return index
        out: list = []
        for i in items:
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool and i in self.values:
                positions = self._real(torch.Tensor.nonzero, (i,), {"as_tuple": True})
                if positions is _UNKNOWN:
                    return index
                out.extend(self._fake_like(p, i.device) for p in positions)
            else:
                out.append(i)
        return tuple(out)


# matmuls whose CPU and CUDA kernels refuse operands of two dtypes (aten/src/ATen/native/LinearAlgebra.cpp
# addmm_impl_cpu_ "expected m1 and m2 to have the same dtype"; cuda/Blas.cpp "expected mat1 and mat2 to have the
# same dtype"), where the meta kernels fake tensors run return a result: (function, index of each operand)
_SAME_DTYPE_OPERANDS = {"linear": (0, 1), "matmul": (0, 1), "__matmul__": (0, 1), "__rmatmul__": (0, 1),
                        "mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}


class MatmulDtypes(TorchFunctionMode):
    """Refuse a matmul of two floating dtypes outside autocast, as the run's kernels do (a float32 activation into
    bfloat16 weights: peft's float32 prompt mask times ModernBERT's bf16 hidden states in its mean pooling), with
    one line instead of a traced number for a run that cannot happen. Under the emulated CUDA autocast the
    operands arrive cast (emulate.CudaEmulation is the mode above this one); under CPU autocast this is skipped."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        operands = _SAME_DTYPE_OPERANDS.get(getattr(func, "__name__", ""))
        if operands is not None and len(args) > max(operands) and not torch.is_autocast_enabled("cpu"):
            a, b = (args[i] for i in operands)
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()
                    and b.is_floating_point() and a.dtype != b.dtype):
                raise ConfigError(f"{self.what} fails in the run: {func.__name__} of a {a.dtype} tensor by a "
                                  f"{b.dtype} one, which the CPU and CUDA kernels refuse (expected both operands "
                                  f"to have the same dtype); the trace stops where the run would")
        return func(*args, **kwargs)


@contextlib.contextmanager
def grouped_mm_in_any_dtype() -> Iterator[None]:
    """transformers' MoE experts (integrations/moe.py, ``grouped_mm_experts_forward``, chosen on any device)
    call ``torch.nn.functional.grouped_mm`` in the weights' dtype when ``_can_use_grouped_mm`` says yes: on a CPU
    with torch > 2.8 (and on CUDA SM 8.0+) for every dtype, and the CPU kernel runs float32. torch's meta kernel
    (_meta_registrations.py ``_meta_grouped_mm_common``) copies only the bf16 fast path's check and refuses float32,
    so fake tensors fail where the run does not: its output, ``_create_grouped_mm_output_tensor``, without the
    bf16-only check. Out-of-range dtypes (fp8 scaled grouped mm) are another op and keep their own checks."""
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    def meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):  # noqa: ANN001, ANN202
        torch._check(mat_a.dtype == mat_b.dtype and mat_a.is_floating_point(),
                     lambda: f"grouped_mm operands must share a floating dtype, got {mat_a.dtype} and {mat_b.dtype}")
        torch._check(bias is None, lambda: "Bias tensor provided, but it is not supported yet.")
        return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_grouped_mm", meta, "Meta", allow_override=True)
    try:
        yield
    finally:
        lib._destroy()
