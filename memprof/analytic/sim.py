"""A symbolic replay of autograd's memory behaviour, in pure Python (no torch).

Model scripts (forward.py, families/) describe a forward pass op by op, as the transformers code runs it. Each op keeps
for backward what PyTorch's autograd keeps (tools/autograd/derivatives.yaml), and only when the other operand
needs a gradient (``mm`` keeps ``self`` only if ``mat2`` requires grad), so frozen weights don't make their
inputs stay alive. Sizes are polynomials in batch b and sequence length s over the basis
(b*s, b*s*s, b, s, 1, s*s): one replay serves every (b, s).

``Graph.backward`` then replays autograd's engine in reverse creation order: a gradient buffer for every input
that needs one (accumulated in place when the input already has one and autograd may reuse it; views and clones
pass the buffer through), output gradients and saved tensors released after each node. Every allocation is a candidate peak.
The script marks segments (embedding, first block, a repeated block, head) so compose.py can assemble a model
of any depth from one replay.

Longer than 500 lines because the ops and the engine replay share one bookkeeping (Storage refs, Node flags, views):
split, each half would reach into the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Poly = tuple  # coefficients of (b*s, b*s*s, b, s, 1, s*s); s*s: a mask broadcast over the batch (stride 0)
ZERO: Poly = (0, 0, 0, 0, 0, 0)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "bool": 1, "int64": 8, "int8": 1, "nf4": 0.5}
FLOATING = ("fp32", "bf16", "fp16")


def P(bs: float = 0, bss: float = 0, b: float = 0, s: float = 0, c: float = 0, ss: float = 0) -> Poly:
    return (bs, bss, b, s, c, ss)


def padd(p: Poly, q: Poly) -> Poly:
    return (p[0] + q[0], p[1] + q[1], p[2] + q[2], p[3] + q[3], p[4] + q[4], p[5] + q[5])


def psub(p: Poly, q: Poly) -> Poly:
    return (p[0] - q[0], p[1] - q[1], p[2] - q[2], p[3] - q[3], p[4] - q[4], p[5] - q[5])


def pscale(p: Poly, k: float) -> Poly:
    return (p[0] * k, p[1] * k, p[2] * k, p[3] * k, p[4] * k, p[5] * k)


def peval(p: Poly, b: int, s: int) -> float:
    return p[0] * b * s + p[1] * b * s * s + p[2] * b + p[3] * s + p[4] + p[5] * s * s


def dominated(p: Poly, q: Poly) -> bool:
    """p <= q for all b, s >= 1: every monomial is positive, so compare coefficient-wise."""
    return (p[0] <= q[0] and p[1] <= q[1] and p[2] <= q[2] and p[3] <= q[3] and p[4] <= q[4]
            and p[5] <= q[5])


def promote(a: T, b: T | None) -> str:
    """torch type promotion between two floating tensors: the wider dtype (a Python scalar keeps a's)."""
    if b is None or a.dtype == b.dtype:
        return a.dtype
    return "fp32" if "fp32" in (a.dtype, b.dtype) else a.dtype


def _size(p: Poly) -> float:
    """A size to compare shapes by (b and s large)."""
    return peval(p, 1024, 1024)


# Storage fates, named as records.Category values
PARAM_T, PARAM_F, GRAD, OPT, MASTER, WCOPY, ACT, TEMP, INPUT = (
    "params_trainable", "params_frozen", "gradients", "optimizer_states", "master_weights", "weight_copies",
    "activations", "temporaries", "inputs")


class Storage:
    __slots__ = ("nbytes", "refs", "saved", "alive", "fate", "seg", "label", "dtype", "carried", "param")

    def __init__(self, nbytes: Poly, seg: str, label: str, fate: str | None, dtype: str = "") -> None:
        self.dtype = dtype
        # held by a per-step container beyond its block (autocast's weight cache, a prefix KV cache): every
        # block's copy stays alive until the container is cleared, so a deeper model frees one per block
        self.carried = False
        self.nbytes = nbytes
        self.refs = 0
        self.saved = 0
        self.alive = True
        self.fate = fate   # fixed at creation (grads, inputs, weight copies) or resolved after forward
        self.seg = seg
        self.label = label
        self.param: Storage | None = None  # made from this parameter by ops needing no gradient (Graph._param_of)


class T:
    """A tensor handle: numel elements of dtype, last dimension ``width``, on a (possibly shared) storage."""

    __slots__ = ("numel", "width", "dtype", "rg", "st", "base", "label")

    def __init__(self, numel: Poly, width: int, dtype: str, rg: bool, st: Storage, base: "T | None",
                 label: str) -> None:
        self.numel = numel
        self.width = width
        self.dtype = dtype
        self.rg = rg
        self.st = st
        self.base = base   # views: their gradient is their base's gradient (no buffer of their own)
        self.label = label

    @property
    def rows(self) -> Poly:
        return pscale(self.numel, 1 / self.width)

    @property
    def root(self) -> "T":
        t = self
        while t.base is not None:
            t = t.base
        return t


class Node:
    __slots__ = ("inputs", "outputs", "saved", "alloc", "views", "extra", "seg", "name", "unpacks")

    def __init__(self, inputs: list[T], outputs: list[T], saved: list[Storage], alloc: list[bool],
                 extra: Poly, seg: str, name: str, views: list[bool | None] | None = None) -> None:
        self.inputs = inputs      # inputs that receive a gradient
        self.outputs = outputs
        self.saved = saved
        self.alloc = alloc        # per input: a new gradient buffer (False: the output gradient is passed on)
        # per input: the gradient reaches the input's root as a view (True), a tensor of its own (False), or, for
        # a passed-on output gradient, as whatever that gradient is (None): see ``grad_arrives_as_view``
        self.views = views or [None if not a else False for a in alloc]
        self.extra = extra        # kernel-internal temporaries while this node runs backward (bytes)
        self.seg = seg
        self.name = name
        self.unpacks = bool(saved)  # saves any tensor, parameters included (a checkpoint recomputes at the first)


def grad_arrives_as_view(t: T, op_view: bool | None) -> bool | None:
    """Whether the gradient an op hands to ``t`` reaches ``t.root``'s buffer as a view (see Graph.backward).

    Autograd's backward of a reshape-like view (view, reshape, _unsafe_view, transpose, permute: derivatives.yaml
    ``grad.reshape_symint(self.sym_sizes())``, ``grad.transpose(...)``) returns a view of the gradient it gets; the
    backward of a slice, select, narrow or expand returns a new tensor (slice_backward's zeros, sum_to).
    The view nearest the root decides, since its backward runs last. Not a view of the root: the op decides.
    """
    if t.base is None:
        return op_view
    while t.base.base is not None:
        t = t.base
    return t.numel == t.base.numel


@dataclass
class Event:
    kind: str                     # alloc | free | cand | seg
    seg: str
    st: Storage | None = None
    extra: Poly = ZERO


class Region:
    """A checkpointed block (torch.utils.checkpoint, non-reentrant): its nodes keep nothing in forward; the
    backward recomputes the block, re-allocating what they would have kept."""

    __slots__ = ("first", "holds", "saved", "cands", "start", "virtual", "done")

    def __init__(self, first: int, holds: list[T], start: Poly) -> None:
        self.first = first          # index of its first node
        self.holds = holds          # the block's inputs, kept by checkpoint until the block's backward
        self.saved: dict[Storage, int] = {}
        self.cands: list[Poly] = []  # recompute peaks relative to the live bytes before it
        self.start = start
        self.virtual = ZERO         # bytes the nodes would be keeping had the block not been checkpointed
        self.done = False


@dataclass
class Graph:
    """Records a forward pass; ``backward`` replays the engine. Scripts ``drop`` handles where Python does."""

    device: str = "cuda"
    nodes: list[Node] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    seg: str = "setup"
    live: Poly = ZERO
    region: Region | None = None
    node_region: dict[int, Region] = field(default_factory=dict)
    leaf_holds: list[T] = field(default_factory=list)   # non-parameter leaves that require grad
    # autograd accumulates a second gradient into the first in place unless the tensors are "subclass-like",
    # which ATen reports for every tensor while a TorchDispatchMode is active (a tracker, FakeTensorMode):
    # then old, new and their sum coexist. True models a plain run, False a tracked or traced one.
    inplace_accumulation: bool = True
    # every parameter already has a .grad when the backward starts (a micro-batch after the first under gradient
    # accumulation, or zero_grad(set_to_none=False)): AccumulateGrad adds each new gradient into it in place
    # (accumulate_grad.h, case 2.3, under a dispatch mode too) and the new buffer dies at once
    grads_kept: bool = False
    step_holds: list[T] = field(default_factory=list)   # held by the loop past the backward (kept outputs)
    # parameters standing in for those of blocks the replay does not run (``stand_in``): the gradient the replay
    # hands them is consumed by the composed copies of the middle block, so it is counted as pending (see there)
    stand_ins: set = field(default_factory=set)
    # DeepSpeed ZeRO-3's memory_efficient_linear (on by default; zero/partition_parameters.py
    # _enable_mem_efficient_linear): F.linear becomes zero/linear.py LinearFunctionForZeroStage3, which saves its
    # input, weight and bias whatever needs a gradient (a frozen weight's input too) and returns gradients of its own
    ds_linear: bool = False
    param_list: list = field(default_factory=list)      # every parameter handle, in creation order
    grad_uses: set = field(default_factory=set)         # ids of parameter storages read by an op whose output
                                                        # needs a gradient (the others' modules get no backward)

    # ---- lifetime -----------------------------------------------------------------------------------
    def _alloc(self, nbytes: Poly, label: str, fate: str | None) -> Storage:
        st = Storage(nbytes, self.seg, label, fate)
        self.events.append(Event("alloc", self.seg, st))
        self.live = padd(self.live, nbytes)
        if self.region is not None:
            self.region.cands.append(padd(psub(self.live, self.region.start), self.region.virtual))
        return st

    def _release(self, st: Storage) -> None:
        if st.alive and st.refs <= 0 and st.saved <= 0:
            st.alive = False
            self.live = psub(self.live, st.nbytes)
            self.events.append(Event("free", self.seg, st))
            if self.region is not None and st in self.region.saved:
                self.region.virtual = padd(self.region.virtual, st.nbytes)

    def begin_checkpoint(self, inputs: list[T | None]) -> None:
        holds = [self.alias(t) for t in inputs if t is not None]
        self.region = Region(len(self.nodes), holds, self.live)

    def end_checkpoint(self) -> None:
        region = self.region
        assert region is not None
        for i in range(region.first, len(self.nodes)):
            self.node_region[i] = region
        self.region = None

    def _recompute(self, region: Region) -> None:
        """Backward reached a checkpointed block: rerun its forward, re-allocating what its nodes keep."""
        region.done = True
        for c in region.cands:
            self.cand(c)
        for st, count in region.saved.items():
            if not st.alive:
                st.alive = True
                self.live = padd(self.live, st.nbytes)
                self.events.append(Event("alloc", self.seg, st))
            st.saved += count

    def new(self, numel: Poly, width: int, dtype: str, label: str, fate: str | None = None) -> T:
        st = self._alloc(pscale(numel, BYTES[dtype]), label, fate)
        st.dtype = dtype
        st.refs = 1
        return T(numel, width, dtype, False, st, None, label)

    def param(self, numel: int, width: int, dtype: str, trainable: bool, label: str) -> T:
        """A parameter: its bytes are counted by the model-state terms, not here."""
        st = Storage(ZERO, self.seg, label, PARAM_T if trainable else PARAM_F)
        st.refs = 1 << 40
        t = T(P(c=numel), width, dtype, trainable, st, None, label)
        self.param_list.append(t)
        return t

    def stand_in(self, numel: int, width: int, dtype: str, label: str) -> T:
        """A trainable parameter of a block this replay does not run, used by something outside the blocks (AdaLoRA's
        orthogonality loss over every factor). Its gradient arrives here and waits for the block's own backward,
        which only the composed copies of the middle block run: in a tracked replay, where those copies turn one
        pending gradient into the parameter's .grad each, it is pending (a temporary) until then; in a plain one it
        is the .grad they add to in place."""
        t = self.param(numel, width, dtype, True, label)
        self.stand_ins.add(id(t.st))
        return t

    def given(self, numel: Poly, width: int, dtype: str, label: str, fate: str = INPUT) -> T:
        """A tensor alive before the step starts (the batch); counted in the base, not allocated here."""
        st = Storage(ZERO, self.seg, label, fate)
        st.refs = 1 << 40
        return T(numel, width, dtype, False, st, None, label)

    def view(self, t: T, width: int | None = None, numel: Poly | None = None) -> T:
        t.st.refs += 1
        return T(t.numel if numel is None else numel, width or t.width, t.dtype, t.rg, t.st, t, t.label)

    def resize(self, t: T, numel: Poly) -> None:
        """Set the shape of a tensor just created by a generic op (its storage size follows)."""
        t.numel = numel
        t.st.nbytes = pscale(numel, BYTES[t.dtype]) if t.st.nbytes != ZERO else ZERO

    def alias(self, t: T) -> T:
        """The same tensor under another name (``x.to(x.dtype)``, dropout with p=0): one more reference."""
        t.st.refs += 1
        return t

    def drop(self, *ts: T | None) -> None:
        for t in ts:
            if t is not None:
                t.st.refs -= 1
                self._release(t.st)

    def cand(self, extra: Poly = ZERO) -> None:
        self.events.append(Event("cand", self.seg, None, extra))

    def segment(self, name: str) -> None:
        self.seg = name
        self.events.append(Event("seg", name))

    # ---- autograd nodes -----------------------------------------------------------------------------
    def _node(self, name: str, inputs: list[T], outputs: list[T], saved: list[T | None],
              alloc: list[bool] | None = None, extra: Poly = ZERO, views: list[bool] | None = None) -> bool:
        """``views``: per input, whether the op's backward returns that input's gradient as a view of a tensor it
        made (matmul folds, t()) or of its output gradient (cat); default: none does, passed-on gradients keep
        what they were."""
        flags = alloc or [True] * len(inputs)
        op_views = views or [None if not a else False for a in flags]
        grad_in = [(t, a, grad_arrives_as_view(t, v)) for t, a, v in zip(inputs, flags, op_views) if t.rg]
        params = [self._param_of(t) for t in inputs]
        if not grad_in:
            # made from parameters alone, of a size not in b or s (a cast, Gemma's 1 + w; not a lookup's output):
            # it stands for them
            if inputs and all(params):
                for o in outputs:
                    if o.numel == P(c=o.numel[4]):
                        o.st.param = params[0]
            return False
        for o in outputs:
            o.rg = True
        self.grad_uses.update(id(p) for p in params if p is not None)
        kept = []
        for t in saved:
            if t is not None and t.st.nbytes != ZERO:
                if self.region is not None:
                    self.region.saved[t.st] = self.region.saved.get(t.st, 0) + 1
                else:
                    t.st.saved += 1
                kept.append(t.st)
        node = Node([t for t, _, _ in grad_in], outputs, kept, [a for _, a, _ in grad_in], extra, self.seg, name,
                    [v for _, _, v in grad_in])
        node.unpacks = any(t is not None for t in saved)
        self.nodes.append(node)
        return True

    @staticmethod
    def _param_of(t: T) -> Storage | None:
        """The parameter storage ``t`` is, or was made from by ops needing no gradient (``Storage.param``)."""
        st = t.root.st
        return st if st.fate in (PARAM_T, PARAM_F) else st.param

    # ---- ops ----------------------------------------------------------------------------------------
    def linear(self, x: T, w: T, d_out: int, label: str, bias: T | None = None, w_used: T | None = None,
               out_dtype: str | None = None, f_linear: bool = True, x_saved: T | None = None) -> T:
        """y = x W^T + b (aten addmm/mm): keeps x if W needs a gradient and W if x does. ``w_used`` is the
        tensor the matmul actually reads when it is not the parameter (autocast half copy, dequantized
        4-bit weight): that one is kept alive by the node. ``f_linear``: the op is torch.nn.functional.linear (not
        GPT-2's Conv1D addmm), which ``ds_linear`` replaces. ``x_saved``: the input the call was given, before
        autocast's cast to ``x`` (what ``ds_linear`` keeps)."""
        wt = w_used if w_used is not None else w
        out = self.new(pscale(x.rows, d_out), d_out, out_dtype or x.dtype, label)
        ins = [x, wt] + ([bias] if bias is not None else [])
        # gradients that arrive as views (aten/src/ATen/native/Linear.cpp): a (b, s, k) input is folded to
        # (b*s, k) for addmm/mm (_flatten_nd_linear's view, matmul's reshape + _unsafe_view), so its gradient is
        # the (b*s, k) mm result reshaped back; the weight's is mm_mat2_backward's result through TBackward (.t())
        folded = x.rows[0] != 0 or x.rows[1] != 0 or x.rows[3] != 0   # rows depend on s: x is (b, s, k)
        views = [folded, True] + ([False] if bias is not None else [])
        saved = [x if wt.rg else None, wt if x.rg else None]
        if self.ds_linear and f_linear:
            # LinearFunctionForZeroStage3: ctx.save_for_backward(input, weight, bias); its backward returns
            # grad_output.matmul(weight) (matmul's _unsafe_view: not a view) and an mm result for the weight
            # under autocast it is called with the fp32 input and parameter and keeps those: the half copies its
            # matmul makes are temporaries (weight.t() is a view, which autocast's weight cache skips)
            saved, views = [x_saved if x_saved is not None else x, w], [False] * len(ins)
        self._node("linear", ins, [out], saved, views=views)
        return out

    def bmm(self, a: T, b_: T, numel: Poly, width: int, label: str) -> T:
        out = self.new(numel, width, a.dtype, label)
        # torch.matmul on (b, a, s, d): expand + reshape to 3-D, bmm, _unsafe_view back: both gradients are the
        # bmm results reshaped to 4-D (views)
        self._node("bmm", [a, b_], [out], [a if b_.rg else None, b_ if a.rg else None], views=[True, True])
        return out

    def copy(self, x: T, label: str, dtype: str | None = None, width: int | None = None) -> T:
        """contiguous()/reshape copy/clone/to(dtype): new storage, nothing saved; backward passes the
        gradient on (a new buffer only when the dtype changes)."""
        dtype = dtype or x.dtype
        out = self.new(x.numel, width or x.width, dtype, label)
        self._node("copy", [x], [out], [], [dtype != x.dtype])
        return out

    def cast(self, x: T, dtype: str, label: str, fate: str | None = None) -> T:
        """x.to(dtype): the same tensor when the dtype already matches."""
        if x.dtype == dtype:
            return self.alias(x)
        out = self.new(x.numel, x.width, dtype, label, fate)
        self._node("to", [x], [out], [], [True])
        return out

    def unary(self, x: T, label: str, save: str, dtype: str | None = None, width: int | None = None,
              extra: Poly = ZERO) -> T:
        """Elementwise or row-reduction op. save: 'input' (gelu, silu, pow), 'output' (relu, tanh, softmax,
        log_softmax, rsqrt, exp, sigmoid), 'none' (neg, adding a constant, mean, sum)."""
        numel = x.numel if width is None else pscale(x.rows, width)
        out = self.new(numel, width or x.width, dtype or x.dtype, label)
        saved = [x] if save == "input" else ([out] if save == "output" else [])
        self._node(label, [x], [out], saved, extra=extra)
        return out

    def _promoted_copies(self, ins: list[T], out: T) -> None:
        """CPU binary ops on mixed floating dtypes (bf16 + fp32): TensorIterator's compute_types copies each input
        whose dtype differs from the common one (``op.tensor().to(common_dtype_)``, "Promotes inputs by creating
        temporaries", aten/src/ATen/TensorIterator.cpp; CUDA kernels cast on the fly). The copies live while
        the op runs, beside its output, and are allocated inside the kernel, below the dispatcher: a tracker
        never sees them, so only a plain run (``inplace_accumulation``) counts them."""
        if self.device == "cuda" or not self.inplace_accumulation:
            return
        extra = ZERO
        for t in ins:
            if t.dtype != out.dtype and t.dtype in FLOATING:
                extra = padd(extra, pscale(t.numel, BYTES[out.dtype]))
        if extra != ZERO:
            self.cand(extra)

    def add(self, a: T, b_: T | None, label: str, dtype: str | None = None) -> T:
        """a + b (b None: a Python scalar). Saves nothing; the bigger operand sets the shape."""
        big = a if b_ is None or _size(a.numel) >= _size(b_.numel) else b_
        out = self.new(big.numel, big.width, dtype or promote(a, b_), label)
        ins = [a] + ([b_] if b_ is not None else [])
        if dtype is None or dtype == promote(a, b_):
            self._promoted_copies(ins, out)
        # AddBackward hands the same gradient tensor to both inputs (a reduced copy for a broadcast one)
        alloc = [t.numel != out.numel or t.dtype != out.dtype for t in ins]
        self._node("add", ins, [out], [], alloc)
        return out

    def mul(self, a: T, b_: T | None, label: str, dtype: str | None = None) -> T:
        """a * b: keeps a if b needs a gradient, b if a does (b None: a Python scalar, nothing kept)."""
        big = a if b_ is None or _size(a.numel) >= _size(b_.numel) else b_
        out = self.new(big.numel, big.width, dtype or promote(a, b_), label)
        if b_ is not None and (dtype is None or dtype == promote(a, b_)):
            self._promoted_copies([a, b_], out)
        if b_ is None:
            self._node("mul", [a], [out], [])
        else:
            # the gradient of a broadcast operand is sum_to_size(grad * other): a temporary of the output's size
            small = [t for t in (a, b_) if t.rg and t is not big and _size(t.numel) < _size(out.numel)]
            extra = pscale(out.numel, BYTES[out.dtype]) if small else ZERO
            self._node("mul", [a, b_], [out], [a if b_.rg else None, b_ if a.rg else None], extra=extra)
        return out

    def dropout(self, x: T, p: float, label: str) -> T:
        """Training dropout. CUDA fuses it (native_dropout) and keeps a 1-byte bool mask; the CPU kernel
        keeps a mask in x's dtype. p = 0 returns x itself."""
        if p <= 0:
            return self.alias(x)
        out = self.new(x.numel, x.width, x.dtype, label)
        mask = self.new(x.numel, x.width, "bool" if self.device == "cuda" else x.dtype, label + " mask")
        self._node("dropout", [x], [out], [mask])
        self.drop(mask)
        return out

    def layer_norm(self, x: T, w: T, b: T | None, label: str, out_dtype: str | None = None) -> T:
        """native_layer_norm keeps its input and a per-row mean and rstd (fp32 on CUDA, x's dtype on CPU)."""
        out = self.new(x.numel, x.width, out_dtype or x.dtype, label)
        stats = self.new(pscale(x.rows, 2), 2, "fp32" if self.device == "cuda" else x.dtype, label + " mean/rstd")
        self._node("layer_norm", [x, w] + ([b] if b is not None else []), [out], [x, stats])
        self.drop(stats)
        return out

    def embedding(self, ids: T, w: T, h: int, dtype: str, label: str) -> T:
        """Embedding lookup: keeps the indices (already alive) for the weight's dense gradient."""
        out = self.new(pscale(ids.numel, h), h, dtype, label)
        self._node("embedding", [w], [out], [ids])
        return out

    def cat(self, parts: list[T], label: str) -> T:
        numel = ZERO
        for t in parts:
            numel = padd(numel, t.numel)
        out = self.new(numel, parts[0].width, parts[0].dtype, label)
        # CatBackward0 (cat_tensors_backward): each part's gradient is a narrow() view of the output gradient
        self._node("cat", list(parts), [out], [], [False] * len(parts), views=[True] * len(parts))
        return out

    def custom(self, name: str, inputs: list[T], outputs: list[T], saved: list[T | None],
               alloc: list[bool] | None = None, extra: Poly = ZERO) -> bool:
        """A node with explicit saved tensors (attention kernels, losses)."""
        return self._node(name, inputs, outputs, saved, alloc, extra)

    # ---- backward -----------------------------------------------------------------------------------
    def backward(self, loss: T, seg_of: dict[str, str]) -> list[Storage]:
        """Replay the engine from ``loss``; returns the parameters' gradient storages.

        Per node, in the engine's order (torch/csrc/autograd/engine.cpp, evaluate_function): the node computes
        its input gradients while its output gradients are alive; returning from the call releases the output
        gradients, then the saved tensors; only then are the new gradients accumulated into the buffers of the
        nodes that consume them (in place, or out of place under a dispatch mode).
        A buffer's ``refs`` counts the pending entries (and .grad slots) holding it.

        In place means ``old.add_(new)`` in InputBuffer's accumulate (torch/csrc/autograd/input_buffer.cpp, torch
        2.13), taken only when ``can_accumulate_inplace(old)``: not subclass-like (no dispatch mode), non-overlapping
        and dense, ``adjusted_use_count(old) == 1`` (no other pending entry holds it: ``refs == 1``) and
        ``old.storage().use_count() == 1``. A view's storage is also held by its base, which the view keeps alive
        (``_base``), so a gradient that arrived as a view (``grad_arrives_as_view``) is added out of place
        (``old + new``, a new tensor that later arrivals may reuse). Parameters' buffers follow the same rule (the
        AccumulateGrad node's InputBuffer), e.g. a tied embedding's second gradient added to the LM head's t() view.
        """
        pending: dict[int, Storage] = {}
        param_grads: dict[int, Storage] = {}
        # entries whose gradient tensor is a view of another tensor (keyed like pending / param_grads)
        as_view: dict[tuple[bool, int], bool] = {}
        arrivals = self._param_arrivals(loss) if self.grads_kept else {}
        grad_fate = TEMP if self.grads_kept else GRAD

        def fate_of(root: T) -> str:
            return TEMP if id(root.st) in self.stand_ins and not self.inplace_accumulation else grad_fate
        seed = self._alloc(pscale(loss.numel, BYTES[loss.dtype]), "grad of loss", None)
        seed.refs = 1
        pending[id(loss)] = seed
        as_view[(False, id(loss))] = False
        current = None
        for index in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[index]
            region = self.node_region.get(index)
            outs_view = [as_view.pop((False, id(o)), False) for o in node.outputs if id(o) in pending]
            outs = [pending.pop(id(o)) for o in node.outputs if id(o) in pending]
            if not outs:
                if region is not None and index == region.first:
                    self.drop(*region.holds)
                continue
            for g in outs:
                g.refs -= 1
            seg = seg_of.get(node.seg, "b:" + node.seg)
            if seg != current:
                current = seg
                self.segment(seg)
            if region is not None and not region.done and node.unpacks:
                # non-reentrant checkpoint recomputes when a node first unpacks a saved tensor (a parameter too):
                # nodes that keep nothing (a cast's or a residual add's backward, at the end of Gemma-2/3's sandwich
                # norms) run first
                self._recompute(region)
            # 1. the node's call: new gradient buffers (a view of the output gradient when passed through)
            produced = []
            for t, alloc, view in zip(node.inputs, node.alloc, node.views):
                root = t.root
                is_param = root.st.fate in (PARAM_T, PARAM_F)
                if is_param:
                    g = self._alloc(pscale(root.numel, BYTES[root.dtype]), "grad " + root.label, fate_of(root))
                elif alloc:
                    g = self._alloc(pscale(root.numel, BYTES[t.dtype]), "grad " + t.label, None)
                else:
                    g = outs[0]
                    view = outs_view[0] if view is None else view
                g.refs += 1
                produced.append((root, g, is_param, t.label, bool(view)))
            self.cand(node.extra)
            # 2. the call returns: output gradients and saved tensors go
            for g in outs:
                self._release(g)
            for st in node.saved:
                st.saved -= 1
                self._release(st)
            # 3. accumulation into the consumers' buffers (and AccumulateGrad for parameters)
            for root, g, is_param, label, view in produced:
                g.refs -= 1
                slots = param_grads if is_param else pending
                old = slots.get(id(root))
                if old is None:
                    g.refs += 1
                    slots[id(root)] = g
                    as_view[(is_param, id(root))] = view
                elif self.inplace_accumulation and old.refs == 1 and not as_view[(is_param, id(root))]:
                    # in place only when nothing else holds the old buffer or its storage (can_accumulate_inplace)
                    if is_param:
                        g.fate = TEMP  # a second gradient for the same parameter (tied embeddings) never is .grad
                    self._release(g)            # old.add_(new)
                else:
                    if is_param:
                        g.fate = TEMP
                    total = self._alloc(old.nbytes, "grad sum " + label, fate_of(root) if is_param else None)
                    self.cand()
                    if is_param:
                        old.fate = TEMP
                    old.refs -= 1
                    self._release(old)
                    self._release(g)
                    total.refs = 1
                    slots[id(root)] = total
                    as_view[(is_param, id(root))] = False
                if is_param and self.grads_kept and id(root.st) not in self.stand_ins:
                    arrivals[id(root)] -= 1
                    if arrivals[id(root)] == 0:  # AccumulateGrad runs: .grad += new, in place; new dies
                        done = param_grads.pop(id(root))
                        as_view.pop((True, id(root)))
                        done.refs -= 1
                        self._release(done)
            if region is not None and index == region.first:
                self.drop(*region.holds)
        for g in pending.values():   # gradients of leaves that are not parameters die with the graph
            g.refs = 0
            self._release(g)
        self.drop(*self.leaf_holds)
        return list(param_grads.values())

    def _param_arrivals(self, loss: T) -> dict[int, int]:
        """How many gradients each parameter's AccumulateGrad waits for: its uses by nodes the backward
        reaches from ``loss`` (the engine's dependency count)."""
        reached, arrivals = {id(loss)}, {}
        for node in reversed(self.nodes):
            if not any(id(o) in reached for o in node.outputs):
                continue
            for t in node.inputs:
                root = t.root
                if root.st.fate in (PARAM_T, PARAM_F):
                    arrivals[id(root)] = arrivals.get(id(root), 0) + 1
                else:
                    reached.add(id(root))
        return arrivals
