"""QLoRA for the traced estimator: bitsandbytes' 4-bit linear layers, emulated for memory, not for values.

bitsandbytes cannot run under FakeTensorMode (its kernels read real data), so a trace swaps every frozen
linear the bitsandbytes integration would quantize for ``EmulatedLinear4bit``, which holds what
``bnb.nn.Linear4bit`` holds (a uint8 tensor of packed 4-bit codes, the block constants) and spends memory as
``bnb.autograd._functions.MatMul4Bit`` does: dequantize the weight for the forward matmul and free it, keep
only the packed weight for backward, dequantize again there for the input gradient. Real QLoRA measurements
use bitsandbytes itself (harness.quantize_blocks_4bit, CUDA only).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import QuantSpec
from ..records import Category
from .tracker import label_in_active_trackers

try:  # transformers' GPT-2 projection layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

SKIP = ("lm_head", "classifier", "score")  # transformers keeps the output layer in the compute dtype


class Params4bit(nn.Parameter):
    """Packed 4-bit codes, two per byte. Named like bitsandbytes' class so parameter counters unpack it (x2)."""


class _MatMul4Bit(torch.autograd.Function):
    """bnb.autograd._functions.MatMul4Bit: ``linear(A, dequantize_4bit(B).to(A.dtype).t(), bias)``, where the
    dequantization comes out in the dtype the weight was stored from (``quant_state.dtype``)."""

    @staticmethod
    def forward(ctx, x, packed, bias, out_features: int, in_features: int, stored: torch.dtype):  # noqa: ANN001, ANN205
        weight = _dequantize((out_features, in_features), stored, x.dtype, x.device, label=True)
        ctx.shape, ctx.stored = (out_features, in_features), stored
        ctx.save_for_backward(packed)  # a parameter: costs nothing more
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (packed,) = ctx.saved_tensors
        # dequantized again: a transient inside the backward call, a temporary (as the estimator files it)
        weight = _dequantize(ctx.shape, ctx.stored, grad.dtype, grad.device, label=False)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def _dequantize(shape: tuple[int, int], stored: torch.dtype, dtype: torch.dtype, device: torch.device,
                label: bool) -> torch.Tensor:
    """F.dequantize_4bit (an empty tensor of the stored dtype: values never matter here), then .to(dtype)."""
    weight = torch.empty(*shape, dtype=stored, device=device)
    if label:
        label_in_active_trackers(weight, Category.weight_copies)
    if stored != dtype:
        weight = weight.to(dtype)
        if label:
            label_in_active_trackers(weight, Category.weight_copies)
    return weight


class EmulatedLinear4bit(nn.Module):
    """A frozen linear stored as NF4/FP4 codes with bitsandbytes' constants (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, quant: QuantSpec,
                 device: torch.device, stored: torch.dtype, compute: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.stored, self.compute = stored, compute
        n = in_features * out_features
        blocks = math.ceil(n / quant.blocksize)
        self.weight = Params4bit(torch.empty(math.ceil(n / 2), 1, dtype=torch.uint8, device=device),
                                 requires_grad=False)
        if quant.double_quant:  # 8-bit absmax per block + one fp32 constant per 256 blocks
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.empty(math.ceil(blocks / 256), dtype=torch.float32,
                                                              device=device))
        else:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bnb.nn.Linear4bit.forward: the input and bias in the compute dtype, the output back in the input's
        inp_dtype = x.dtype
        x = x.to(self.compute)
        bias = None if self.bias is None else self.bias.to(self.compute)
        out = _MatMul4Bit.apply(x, self.weight, bias, self.out_features, self.in_features, self.stored)
        return out.to(inp_dtype)


def emulate_4bit(model: nn.Module, quant: QuantSpec, compute: torch.dtype) -> int:
    """Swap every frozen nn.Linear / Conv1D except the output layers for EmulatedLinear4bit, in place (LoRA
    wrappers keep their adapters: their ``base_layer`` is swapped), with ``compute`` as bitsandbytes'
    compute dtype (memprof's QLoRA uses the run's dtype, as harness.quantize_blocks_4bit does). Returns the
    number of layers swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if any(part in SKIP for part in full.split(".")):
                continue
            if isinstance(child, nn.Linear) and not child.weight.requires_grad:
                in_f, out_f = child.in_features, child.out_features
            elif Conv1D and isinstance(child, Conv1D) and not child.weight.requires_grad:
                in_f, out_f = child.weight.shape
            else:
                continue
            if "lora_" in full:  # the adapters themselves stay in their own dtype
                continue
            setattr(module, child_name, EmulatedLinear4bit(in_f, out_f, child.bias, quant, child.weight.device,
                                                           child.weight.dtype, compute))
            swapped += 1
    return swapped
