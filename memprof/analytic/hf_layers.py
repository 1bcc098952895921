"""Small pieces of transformers that every family's script runs (pure): ``ACT2FN`` activations
(transformers 5.23 activations.py) and the input-embedding hook of ``enable_input_require_grads``
(modeling_utils.py), which gradient checkpointing installs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sim import T

if TYPE_CHECKING:
    from .context import Ctx


def activation(ctx: Ctx, x: T, label: str) -> T:
    """transformers' ACT2FN[hidden_act] on x."""
    g = ctx.g
    act = ctx.spec.hidden_act
    if act == "gelu_new" or act == "gelu_fast":
        # NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))); under autocast pow runs
        # in fp32 and the rest of the expression is promoted to fp32
        xp = ctx.to_fp32(x, label + " pow")
        x3 = g.unary(xp, label + " x^3", "input")
        g.drop(xp)
        t = g.mul(x3, None, label + " 0.044715x^3")
        g.drop(x3)
        u = g.add(x, t, label + " x + ...")
        g.drop(t)
        w = g.mul(u, None, label + " * sqrt(2/pi)")
        g.drop(u)
        th = g.unary(w, label + " tanh", "output")
        g.drop(w)
        one = g.add(th, None, label + " 1 + tanh")
        g.drop(th)
        half = g.mul(x, None, label + " 0.5x")
        out = g.mul(half, one, label)
        g.drop(half, one)
        return out
    if act == "relu":
        return g.unary(x, label, "output")
    return g.unary(x, label, "input")  # gelu, gelu_pytorch_tanh, silu: keep their input


def input_embeddings(ctx: Ctx, e: T) -> T:
    """Gradient checkpointing calls enable_input_require_grads: a forward hook on the input embeddings makes
    their output require grad even when the embedding matrix is frozen."""
    if ctx.setup.grad_checkpointing and not e.rg:
        # a leaf that requires grad: its AccumulateGrad node keeps it alive until the backward ends
        e.rg = True
        ctx.g.leaf_holds.append(ctx.g.alias(e))
    return e

