"""Ops whose backward the symbolic replay gives extra temporaries, against a real CPU step under memprof's tracker.

AdaLoRA's division by a trained rank counter: peft's SVDLinear adds ``(x @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)`` in place to the base output; on CUDA or a
half base ``ranknum`` trains, and DivBackward0 then builds the divisor's gradient over a product-sized tensor.
``peft_methods.adalora`` replays that node with three product-sized temporaries after self's gradient; here the same
ops run for real under memprof's tracker and the replay (the same Graph calls) must give the same backward peak.
LoKr's ``torch.kron(w1, w2) * scale``: kron is a broadcast multiply, whose backward returns both factors' gradients
at the product's size before the engine sums them down (``peft_methods.lycoris``: two product-sized temporaries).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from memprof.analytic.sim import BYTES, Graph, P, peval, pscale  # noqa: E402
from memprof.runtime.tracker import MemoryTracker  # noqa: E402

ROWS, D_IN, D_OUT, R = 64, 128, 512, 4
TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _real_backward_peak(dtype: str) -> int:
    dt = TORCH[dtype]
    x = torch.randn(ROWS, D_IN, dtype=dt).requires_grad_()
    w = torch.randn(D_OUT, D_IN, dtype=dt)
    a, e, b = (torch.randn(R, D_IN).requires_grad_(), torch.randn(R, 1).requires_grad_(),
               torch.randn(D_OUT, R).requires_grad_())
    rank = torch.ones(1).requires_grad_()

    def forward() -> torch.Tensor:  # locals die on return, as in the layer's forward
        y = torch.nn.functional.linear(x, w)
        y += (x.to(torch.float32) @ (a * e).T @ b.T) * 2.0 / (rank + 1e-5)
        return torch.nn.functional.gelu(y).float().sum()

    return _tracked_backward_peak(forward)


def _tracked_backward_peak(forward) -> int:  # noqa: ANN001
    """Bytes above the live total at the backward's start, at its peak, under memprof's tracker."""
    tracker = MemoryTracker()
    with tracker:
        loss = forward()
        tracker.reset_peak()
        start = tracker.live_breakdown().total_bytes
        loss.backward()
    return tracker.breakdown().total_bytes - start


def _replayed_backward_peak(dtype: str) -> int:
    g = Graph(device="cpu", inplace_accumulation=False)
    x = g.new(P(c=ROWS * D_IN), D_IN, dtype, "x")
    x.rg = True
    w = g.param(D_OUT * D_IN, D_OUT, dtype, False, "w")
    a, e, b = g.param(R * D_IN, R, "fp32", True, "A"), g.param(R, R, "fp32", True, "E"), \
        g.param(D_OUT * R, D_OUT, "fp32", True, "B")
    rank = g.param(1, 1, "fp32", True, "ranknum")
    y = g.linear(x, w, D_OUT, "y")
    xa = g.cast(x, "fp32", "x fp32")
    ae = g.mul(a, e, "A * E")
    h1 = g.linear(xa, ae, R, "h1")
    g.drop(xa, ae)
    h2 = g.linear(h1, b, D_OUT, "h2")
    g.drop(h1)
    h3 = g.mul(h2, None, "h3")
    g.drop(h2)
    re = g.add(rank, None, "ranknum + eps")
    h4 = g.new(h3.numel, D_OUT, "fp32", "h4")
    # the rule peft_methods.adalora applies: three product-sized fp32 temporaries after self's gradient
    g.custom("div", [h3, re], [h4], [h3, re], [True, True], extra=pscale(h3.numel, 3 * BYTES["fp32"]))
    g.drop(h3, re)
    g.custom("add_", [y, h4], [y], [], [False, h4.dtype != y.dtype])
    g.drop(h4)
    out = g.unary(y, "gelu", "input")
    g.drop(y)
    out32 = g.cast(out, "fp32", "gelu out (fp32)")
    g.drop(out)
    loss = g.new(P(c=1), 1, "fp32", "loss")
    g.custom("sum", [out32], [loss], [], [False])  # sum's gradient is an expanded scalar: no storage
    g.drop(out32)
    return _backward_peak(g, loss)


def _backward_peak(g: Graph, loss) -> int:  # noqa: ANN001
    start = len(g.events)
    live = peak = base = peval(g.live, 1, 1)
    g.backward(loss, {})
    for ev in g.events[start:]:
        if ev.kind == "alloc":
            live += peval(ev.st.nbytes, 1, 1)
        elif ev.kind == "free":
            live -= peval(ev.st.nbytes, 1, 1)
        peak = max(peak, live + (peval(ev.extra, 1, 1) if ev.kind == "cand" else 0))
    return int(peak - base)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_division_by_a_trained_rank_counter_matches_a_real_step(dtype: str) -> None:
    # the peak is inside DivBackward0: the output's gradient, self's gradient and the three temporaries, less the gelu
    # input freed before (fp32: 4 x 131,072 B above the start; bf16 adds the half gradient of the base output)
    assert _replayed_backward_peak(dtype) == _real_backward_peak(dtype)


KRON_A, KRON_B = (8, 8), (64, 32)  # w1 (a, c), w2 (b, d): a (512, 256) delta


def _real_kron_peak() -> int:
    w1, w2 = torch.randn(*KRON_A).requires_grad_(), torch.randn(*KRON_B).requires_grad_()
    c = torch.randn(KRON_A[0] * KRON_B[0], KRON_A[1] * KRON_B[1])

    return _tracked_backward_peak(lambda: (torch.kron(w1, w2) * c).sum())


def _replayed_kron_peak() -> int:
    g = Graph(device="cpu", inplace_accumulation=False)
    n = KRON_A[0] * KRON_A[1] * KRON_B[0] * KRON_B[1]
    w1 = g.param(KRON_A[0] * KRON_A[1], KRON_A[0], "fp32", True, "w1")
    w2 = g.param(KRON_B[0] * KRON_B[1], KRON_B[0], "fp32", True, "w2")
    kron = g.new(P(c=n), KRON_A[1] * KRON_B[1], "fp32", "kron")
    # the rule peft_methods.lycoris applies: both product-sized gradients, less w2's reduced one
    g.custom("kron", [w1, w2], [kron], [w1, w2], extra=P(c=2 * n * 4 - 4 * KRON_B[0] * KRON_B[1]))
    c = g.given(P(c=n), KRON_A[1] * KRON_B[1], "fp32", "c")
    prod = g.mul(kron, c, "kron * c")
    g.drop(kron)
    loss = g.new(P(c=1), 1, "fp32", "loss")
    g.custom("sum", [prod], [loss], [], [False])
    g.drop(prod)
    return _backward_peak(g, loss)


def test_kron_backward_matches_a_real_step() -> None:
    # the peak is in kron's backward: the incoming gradient, both factors' product-sized ones and w1's reduced one
    # (3 x 524,288 + 256 B); the real step also still holds the loss's 4-byte seed there (sum's gradient is an
    # expanded view of it, referenced by the engine's input buffer), which the replay releases after the sum
    assert _replayed_kron_peak() == 3 * 524_288 + 256
    assert _real_kron_peak() == 3 * 524_288 + 256 + 4
