"""Assemble a step's memory timeline for a model of any depth from one scripted replay (pure).

The replay (forward.py and families/ on sim.Graph) covers the embedding, the first block, one middle block, the last block
and the head, forward and backward. Each segment contributes (a) its net change of live bytes and (b) its
candidate peaks relative to where it started, per category. The first block differs (its input may not need
a gradient), the last one too (the head, not a block, consumes its output); the middle ones are identical, so
for L blocks the middle block's net change is applied L-2 times, and its candidate peaks are checked at the
first and the last repetition (the live bytes before a repetition are linear in its index, so the extremes
sit at the ends). Two kinds of tensors cross a block's boundary and need the depth spelled out: tensors made
before the blocks and freed inside one (masks, rope tables; ``Segment.shared``: only the last repetition frees
them), and tensors a per-step container keeps beyond their block (autocast's weight cache, a prefix key/value
cache; ``Segment.carried``: where the container is cleared, all L-2 middle blocks' copies go, not the one the
replay made).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from ..config import Overheads, RunSetup
from ..spec import ModelSpec
from .forward import build_context, forward
from .sim import ACT, TEMP, WCOPY, ZERO, Graph, Poly, dominated, padd, pscale, psub

FATES = ("params_trainable", "params_frozen", "gradients", "optimizer_states", "master_weights",
         "weight_copies", "activations", "temporaries", "inputs")
Vec = tuple  # one Poly per fate, in FATES order


def vzero() -> Vec:
    return tuple(ZERO for _ in FATES)


def vadd(a: Vec, b: Vec) -> Vec:
    return tuple(padd(x, y) for x, y in zip(a, b))


def vsub(a: Vec, b: Vec) -> Vec:
    return tuple(psub(x, y) for x, y in zip(a, b))


def vscale(a: Vec, k: float) -> Vec:
    return tuple(pscale(x, k) for x in a)


def vtotal(a: Vec) -> Poly:
    out = ZERO
    for x in a:
        out = padd(out, x)
    return out


@dataclass(frozen=True)
class Segment:
    name: str
    delta: Vec                    # live bytes at the end minus at the start, per fate
    cands: tuple[Vec, ...]        # candidate peaks relative to the start (pruned: none dominated)
    shared: Vec = ()              # frees of tensors made outside the blocks (rope tables, masks) it performs:
                                  # for a repeated block, only its last repetition may free them
    carried: Vec = ()             # frees of the middle block's carried tensors (sim.Storage.carried) this
                                  # segment performs: at depth L it frees L-2 of them, the replay one
    cand_carried: tuple[Vec, ...] = ()  # the carried bytes freed before each candidate (when carried)


@dataclass(frozen=True)
class Replay:
    """Per-segment statistics of one scripted step (forward + backward, no optimizer)."""

    forward: tuple[Segment, ...]      # embed, layer0 [, layer1 [, layer2]], head
    backward: tuple[Segment, ...]     # b:head [, b:layer2 [, b:layer1]], b:layer0, b:embed
    layers: int                       # blocks in the replay (1, 2, or 3: first, middle, last)
    saved_terms: tuple[tuple[str, str, str, Poly], ...]  # (segment, label, dtype, bytes) alive after forward
    # (segment, elements, dtype) of each parameter that no op needing a gradient reads: a frozen module whose input
    # needs none (the first block's under PEFT) has no backward (DeepSpeed ZeRO-3 releases it after its forward)
    idle_params: tuple[tuple[str, int, str], ...] = ()


def _prune(cands: list[Vec]) -> tuple[Vec, ...]:
    totals = [vtotal(c) for c in cands]
    keep: list[int] = []
    for i, t in enumerate(totals):
        if any(dominated(t, totals[j]) and (t != totals[j] or j < i) for j in range(len(cands)) if j != i):
            continue
        keep.append(i)
    return tuple(cands[i] for i in keep)


def replayed_blocks(spec: ModelSpec) -> tuple[str, ...]:
    """The attention type of each block the replay runs: the first, one middle and the last block when every
    middle block is of one type (all models but mixed stacks), else every block (Gemma-2/3's alternating
    sliding and full layers: their masks and rotary tables differ, and the replay is cheap at full depth)."""
    L = spec.num_layers
    types = tuple(spec.layer_type(i) for i in range(L))
    if L <= 3 or len(set(types[1:-1])) == 1:
        return types if L <= 3 else (types[0], types[1], types[-1])
    return types


@functools.lru_cache(maxsize=512)
def replay(spec: ModelSpec, setup: RunSetup, tracked: bool = False, window_reached: bool = False) -> Replay:
    """Script and replay one step of ``spec`` with the blocks ``replayed_blocks`` names (cached per structure).

    ``tracked`` replays a run observed by a TorchDispatchMode (memprof's trace, a CPU breakdown), in which
    autograd accumulates gradients out of place (see ``Graph.inplace_accumulation``). ``window_reached``: the
    sequence reaches the sliding window (forward.window_reached; the structural setup has lost its length).
    """
    blocks = replayed_blocks(spec)
    layers = len(blocks)
    g = Graph(device=setup.device.value, inplace_accumulation=not tracked, grads_kept=setup.grads_kept)
    ctx = build_context(g, spec, setup)
    ctx.layers = layers
    ctx.block_types = blocks
    ctx.window_reached = window_reached
    loss = forward(ctx, layers)
    # fates of forward storages: alive now -> activation, already freed -> temporary
    saved_terms = []
    for ev in g.events:
        st = ev.st
        if ev.kind == "alloc" and st is not None and st.fate is None:
            st.fate = ACT if st.alive else TEMP
            if st.alive:
                saved_terms.append((ev.seg, st.label, st.dtype, st.nbytes))
        elif ev.kind == "alloc" and st is not None and st.fate == WCOPY and st.alive:
            saved_terms.append((ev.seg, "[weight copy] " + st.label, st.dtype, st.nbytes))
    n_forward_events = len(g.events)
    idle = tuple((t.st.seg, t.numel[4], t.st.dtype or t.dtype) for t in g.param_list if id(t.st) not in g.grad_uses)
    seg_of = {name: "b:" + name for name in ("embed", "head", *(f"layer{i}" for i in range(layers)))}
    g.segment("b:head")
    g.backward(loss, seg_of)
    for ev in g.events[n_forward_events:]:
        if ev.kind == "alloc" and ev.st is not None and ev.st.fate is None:
            ev.st.fate = TEMP
    segments = _segments(g, ("layer1", "b:layer1") if layers == 3 else ())
    fwd_names = ["embed", *(f"layer{i}" for i in range(layers)), "head"]
    # the backward visits the blocks last to first: b:head, b:layer2 (last), b:layer1 (middle), b:layer0
    bwd_names = ["b:head", *(f"b:layer{i}" for i in reversed(range(layers))), "b:embed"]
    empty = Segment("", vzero(), (vzero(),))
    return Replay(
        forward=tuple(segments.get(n, Segment(n, vzero(), (vzero(),))) for n in fwd_names),
        backward=tuple(segments.get(n, Segment(n, vzero(), (vzero(),))) if n in segments else
                       Segment(n, empty.delta, empty.cands) for n in bwd_names),
        layers=layers, saved_terms=tuple(saved_terms), idle_params=idle,
    )


def _segments(g: Graph, middle: tuple[str, ...]) -> dict[str, Segment]:
    """Per-segment net changes and candidate peaks relative to each segment's start. ``middle`` names the
    repeated block's forward and backward segments (none when the replay has no middle block)."""
    index = {f: i for i, f in enumerate(FATES)}
    cur = [ZERO] * len(FATES)
    out: dict[str, Segment] = {}
    name, start, cands, cand_carried = None, tuple(cur), [], []
    shared = [ZERO] * len(FATES)
    carried = [ZERO] * len(FATES)

    def close() -> None:
        if name is not None and name != "setup":
            rel = [vsub(c, start) for c in cands] or [vzero()]
            if name in out:
                raise AssertionError(f"segment {name} is not contiguous")
            if any(p != ZERO for p in carried):  # candidates differ by what was freed before them: keep all
                out[name] = Segment(name, vsub(tuple(cur), start), tuple(rel + [vzero()]), tuple(shared),
                                    tuple(carried), tuple(cand_carried + [vzero()]))
            else:
                out[name] = Segment(name, vsub(tuple(cur), start), _prune(rel + [vzero()]), tuple(shared))

    for ev in g.events:
        if ev.kind == "seg":
            if ev.seg == name:
                continue
            close()
            name, start, cands, cand_carried = ev.seg, tuple(cur), [], []
            shared = [ZERO] * len(FATES)
            carried = [ZERO] * len(FATES)
        elif ev.kind == "alloc":
            i = index[ev.st.fate]
            cur[i] = padd(cur[i], ev.st.nbytes)
            cands.append(tuple(cur))
            cand_carried.append(tuple(carried))
        elif ev.kind == "free":
            i = index[ev.st.fate]
            cur[i] = psub(cur[i], ev.st.nbytes)
            if ev.st.seg in ("embed", "setup") and name not in ("embed", "b:embed"):
                shared[i] = padd(shared[i], ev.st.nbytes)
            if ev.st.carried and ev.st.seg in middle and name not in middle:
                carried[i] = padd(carried[i], ev.st.nbytes)
        elif ev.kind == "cand":
            c = list(cur)
            i = index[TEMP]
            c[i] = padd(c[i], ev.extra)
            cands.append(tuple(c))
            cand_carried.append(tuple(carried))
    close()
    return out


@dataclass(frozen=True)
class Timeline:
    """Candidate peaks of a whole step at depth L, per phase, as per-fate polynomials (absolute, excluding
    the model-state base which the caller adds)."""

    forward: tuple[Vec, ...]
    backward: tuple[Vec, ...]
    end_of_forward: Vec
    end_of_backward: Vec
    forward_totals: tuple[Poly, ...] = ()    # vtotal of each candidate (evaluated first, per (b, s))
    backward_totals: tuple[Poly, ...] = ()
    forward_sparse: tuple = ()                # the same candidates as ((category index, poly), ...)
    backward_sparse: tuple = ()
    end_of_backward_sparse: tuple = ()

    @staticmethod
    def sparse(vec: Vec) -> tuple[tuple[int, Poly], ...]:
        """(category index, polynomial) for the categories a candidate actually has."""
        return tuple((k, p) for k, p in enumerate(vec) if p != ZERO)


def _walk(segments: tuple[Segment, ...], repeated: int | None, times: int, live: Vec,
          into: list[Vec]) -> Vec:
    """Run segments in order from ``live``; segment ``repeated`` (an index) runs ``times`` times."""
    for i, seg in enumerate(segments):
        if i == repeated:
            if times <= 0:
                continue
            # shared tensors are released by the last repetition only; earlier ones keep them (their
            # candidates get them back, which overstates candidates that came before the release)
            shared = seg.shared or vzero()       # bytes it frees (delta already has them subtracted)
            per = vadd(seg.delta, shared)         # one repetition without the release
            into.extend(vadd(vadd(live, c), shared) for c in seg.cands)
            last = vadd(live, vscale(per, times - 1))
            into.extend(vadd(last, c) for c in seg.cands)
            live = vsub(vadd(live, vscale(per, times)), shared)
        elif seg.carried and times > 1:
            # the replay freed one middle block's carried tensors here; the other times-1 go at the same point
            more = times - 1
            into.extend(vsub(vadd(live, c), vscale(k, more)) for c, k in zip(seg.cands, seg.cand_carried))
            live = vsub(vadd(live, seg.delta), vscale(seg.carried, more))
        else:
            into.extend(vadd(live, c) for c in seg.cands)
            live = vadd(live, seg.delta)
    return live


def assemble(rep: Replay, num_layers: int) -> Timeline:
    """Depth-L timeline from the replay's segments (see module docstring)."""
    middle = num_layers - 2
    fwd_cands: list[Vec] = []
    bwd_cands: list[Vec] = []
    # forward: embed, first, middle x (L-2), last, head; backward: head, last, middle x (L-2), first, embed
    # (a full-depth replay repeats nothing)
    repeated = 2 if rep.layers == 3 else None
    end_fwd = _walk(rep.forward, repeated, middle, vzero(), fwd_cands)
    live = _walk(rep.backward, repeated, middle, end_fwd, bwd_cands)
    fwd, bwd = _prune(fwd_cands), _prune(bwd_cands)
    return Timeline(fwd, bwd, end_fwd, live, tuple(vtotal(c) for c in fwd), tuple(vtotal(c) for c in bwd),
                    tuple(Timeline.sparse(c) for c in fwd), tuple(Timeline.sparse(c) for c in bwd),
                    Timeline.sparse(live))


def structural(setup: RunSetup) -> RunSetup:
    """The part of a setup that changes the replay and the states (cache key): all but b, s and the overheads,
    except whether b is 1 (a batch of one makes some copies views: attention.attention_core)."""
    b = 1 if setup.batch_size == 1 else 2
    if setup.batch_size == b and setup.seq_len == 1 and setup.overheads == _DEFAULT_OVERHEADS:
        return setup
    return dataclasses.replace(setup, batch_size=b, seq_len=1, overheads=_DEFAULT_OVERHEADS)


_DEFAULT_OVERHEADS = Overheads()


@functools.lru_cache(maxsize=512)
def timeline(spec: ModelSpec, setup: RunSetup, tracked: bool = False, window_reached: bool = False) -> Timeline:
    return assemble(replay(spec, setup, tracked, window_reached), spec.num_layers)
