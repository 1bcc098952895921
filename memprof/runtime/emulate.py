"""Run a step on (fake) CPU tensors the way CUDA kernels would spend memory.

A CPU-only torch build cannot run autograd on fake CUDA tensors (the engine asks for a CUDA device guard),
so the traced estimator runs fake CPU tensors under this TorchFunctionMode, which swaps in the memory
behaviour of CUDA's kernel choices (each rule names the CUDA code path it reproduces):

- dropout: CUDA uses the fused ``native_dropout`` and keeps a 1-byte bool mask (aten ``dropout`` ->
  ``is_fused_kernel_acceptable``); the CPU path keeps a mask in the input dtype. -> ``torch.native_dropout``.
- scaled_dot_product_attention: CUDA picks flash / memory-efficient kernels that keep q, k, v, the output and a
  (b, a, s) fp32 log-sum-exp, with dropout fused (no mask tensor). The CPU flash kernel keeps the same tensors
  but cannot fuse dropout, so SDPA runs with ``dropout_p=0`` here.
- autocast: CUDA's policy (aten/src/ATen/autocast_mode.cpp) casts matmul-like ops to half and softmax,
  log_softmax, layer_norm, pow, rsqrt, sum, losses, ... to fp32; CPU autocast leaves most of those in half.
  ``CudaAutocast`` applies the CUDA lists at the Python API level, with the same cache of half copies of
  leaf tensors that require grad, kept until the autocast region ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# aten/src/ATen/autocast_mode.cpp, CUDA: ops run in the lower-precision dtype
LOWER_PRECISION = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
    "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linear", "addbmm",
    "baddbmm", "bmm", "chain_matmul", "multi_dot", "scaled_dot_product_attention",
}
# ops run in fp32 (fp32 list and fp32_set_opt_dtype list when no dtype is given)
FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum",
    "cross_entropy", "softmin", "rms_norm",
}
PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "tensordot", "index_put", "scatter_add",
           "cat", "stack", "index_copy"}
_SET_OPT_DTYPE = {"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod"}


class CudaAutocast:
    """State of one emulated autocast region: target dtype and the cast cache."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}

    def _to(self, t: Any, dtype: torch.dtype) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if dtype == self.dtype and t.dtype != torch.float32:
            return t  # only fp32 is cast down (autocast leaves fp64 and other halves alone)
        cacheable = dtype == self.dtype and t.is_leaf and t.requires_grad
        if cacheable and id(t) in self.cache:
            return self.cache[id(t)]
        out = t.to(dtype)
        if cacheable:
            self.cache[id(t)] = out
        return out

    def apply(self, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if name in LOWER_PRECISION:
            target = self.dtype
        elif name in FP32:
            if name in _SET_OPT_DTYPE and kwargs.get("dtype") is not None:
                return None
            target = torch.float32
        elif name in PROMOTE:
            floats = [t.dtype for t in _tensors(args, kwargs) if t.is_floating_point()]
            if len(set(floats)) <= 1:
                return None
            target = torch.float32
            return tree_map(lambda t: t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                            (args, kwargs))
        else:
            return None
        return tree_map(lambda t: self._to(t, target), (args, kwargs))


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(lambda t: out.append(t) if isinstance(t, torch.Tensor) else None, (args, kwargs))
    return out


class CudaEmulation(TorchFunctionMode):
    """Reproduce CUDA's memory-relevant kernel choices on CPU (see module docstring)."""

    def __init__(self, autocast: CudaAutocast | None = None) -> None:
        super().__init__()
        self.autocast = autocast

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for torch.utils.checkpoint: torch function modes are not active while autograd
        recomputes a checkpointed block, so the recomputation re-enters the emulation (and the autocast state
        of the forward, with a fresh cache, as torch.utils.checkpoint does for real autocast)."""
        dtype = self.autocast.dtype if self.autocast is not None else None
        return contextlib.nullcontext(), CudaEmulation(CudaAutocast(dtype) if dtype is not None else None)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if func is F.dropout or name == "dropout":
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training and p > 0:
                return torch.native_dropout(x, p, True)[0]
            return x
        if self.autocast is not None:
            cast = self.autocast.apply(name, tuple(args), kwargs)
            if cast is not None:
                args, kwargs = cast
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = tuple(args[:4]) + (0.0,) + tuple(args[5:])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)
