"""Beyond one GPU, answered (issue 12): one rank's analytic estimate across world sizes and data-parallel
strategies, the table of ``memprof compare --world-sizes 1,2,4,8 --strategies fsdp,zero3`` (pure: no torch).

World size 1 is the plain one-device run (no engine, no sharding, no offload): one row per method whatever the
strategies. Each larger world size gives one row per strategy, with the offload, nodes and HSDP shard size of the
flags. A combination the estimator refuses (PEFT under FSDP's mixed precision, gradient accumulation, nodes that
do not divide the world) is a row with status n/a and the one-line reason. Nothing here is traced or measured (DeepSpeed
cannot run on fake tensors; ``memprof measure --nproc N`` measures a data-parallel run).
``fit --strategy`` asks the converse question (analytic/fit.py ``fit_world``): the smallest world that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .comparison import GROUP_COLUMNS, group_of
from .config import Offload, ParallelSpec, RunSetup, Strategy
from .errors import ConfigError, UnsupportedModelError
from .records import setup_row
from .resolve import parse_enum
from .spec import ModelSpec
from .sweep import parse_ints, parse_list

MAX_WORLD_SIZE = 1 << 20  # ParallelSpec's bound


@dataclass(frozen=True)
class WorldPlan:
    """The world sizes and strategies of a sweep, and the other ParallelSpec fields every rank row shares."""

    world_sizes: tuple[int, ...]          # 1 = one device
    strategies: tuple[Strategy, ...]
    options: Mapping[str, Any] = field(default_factory=dict)  # offload, nodes, shard_size (None = not given)


def plan_worlds(world_sizes: str | None, strategies: str | None, flags: Mapping[str, Any]) -> WorldPlan:
    """``--world-sizes 1,2,4,8 --strategies fsdp,zero3`` with the run's parallel flags (``world_size``,
    ``strategy``, ``offload``, ``nodes``, ``shard_size``): a list replaces its single flag, which may not be
    given beside it; without ``--strategies`` the ``--strategy`` flag or ParallelSpec's default (ddp) is swept.

    Raises:
        ConfigError: a list and its flag both given, no world size, a size outside 1..2**20, an unknown strategy.
    """
    if world_sizes is not None and flags.get("world_size") is not None:
        raise ConfigError("give --world-sizes or --world-size, not both")
    if strategies is not None and flags.get("strategy") is not None:
        raise ConfigError("give --strategies or --strategy, not both")
    sizes = parse_ints(world_sizes, "--world-sizes") if world_sizes is not None else (
        (flags["world_size"],) if flags.get("world_size") is not None else ())
    if not sizes:
        raise ConfigError("--strategies needs the world sizes to compare (--world-sizes 1,2,4,8)")
    for n in sizes:
        if not 1 <= n <= MAX_WORLD_SIZE:
            raise ConfigError(f"world sizes must be between 1 and {MAX_WORLD_SIZE}, got {n}")
    names = parse_list(strategies, "--strategies") if strategies is not None else (
        (flags["strategy"],) if flags.get("strategy") is not None else (ParallelSpec().strategy.value,))
    parsed = tuple(dict.fromkeys(parse_enum(Strategy, s.replace("_", "-"), "strategy") for s in names))
    options = {k: flags.get(k) for k in ("offload", "nodes", "shard_size")}
    if options["offload"] is not None:  # a typo is one error, not a column of n/a rows
        options["offload"] = parse_enum(Offload, options["offload"], "offload").value
    return WorldPlan(tuple(dict.fromkeys(sizes)), parsed, options)


def check_ranked_flags(ranked: bool, flags: Mapping[str, Any]) -> None:
    """compare's flags against its per-rank table: ``--gpu`` needs it; tracing, measuring, storing, plotting and
    the category columns do not apply to it (``flags``: flag name -> value given, falsy = not given).

    Raises:
        ConfigError: one line naming the flags.
    """
    if not ranked and flags.get("--gpu") is not None:
        raise ConfigError("--gpu applies to the per-rank table of --world-sizes / --strategies")
    given = [name for name, value in flags.items() if value and name != "--gpu"]
    if ranked and given:
        raise ConfigError(f"{', '.join(given)}: not with --world-sizes / --strategies (the per-rank table is "
                          "analytic; memprof measure --nproc N measures data-parallel ranks)")


@dataclass(frozen=True)
class RankRow:
    """One rank of a data-parallel run (or the one-device run). Bytes are one rank's (one GPU's)."""

    setup: Mapping[str, Any]              # records.setup_row of the one-device run (the join key less the engine)
    world_size: int                       # 1: one device
    strategy: str | None                  # None: one device
    offload: str | None                   # None: nothing offloaded
    status: str                           # ok | n/a (not modelled: see note)
    note: str | None = None
    total_params: int | None = None
    trainable_params: int | None = None
    peak_bytes: int | None = None         # tensor peak of the rank's step
    peak_phase: str | None = None
    allocated_bytes: int | None = None    # + cuBLAS workspace (max_memory_allocated)
    device_total_bytes: int | None = None  # + allocator reserve + CUDA context (nvidia-smi, per GPU)
    host_bytes: int | None = None         # offloaded states in host (CPU) memory, per rank
    gpu: str | None = None                # the GPU checked (--gpu)
    gpu_memory_bytes: int | None = None
    fits: bool | None = None              # device total <= the GPU's memory
    margin_bytes: int | None = None       # memory left (negative: missing)
    estimate_notes: tuple[str, ...] = ()  # the estimator's notes (shown once under the table, not in to_row)
    rank_regime: str | None = None        # the regime each rank runs when the engine sets it (ZeRO in half
                                          # precision: mixed, DeepSpeed's fp32 masters), else None

    def to_row(self) -> dict[str, Any]:
        """Flat dict: setup columns (``regime``: the one each rank runs), then the world and the per-rank bytes."""
        row: dict[str, Any] = dict(self.setup)
        if self.rank_regime is not None:
            row["regime"] = self.rank_regime
        row.update(world_size=self.world_size, strategy=self.strategy, offload=self.offload, status=self.status,
                   total_params=self.total_params, trainable_params=self.trainable_params,
                   peak_bytes=self.peak_bytes, peak_phase=self.peak_phase, allocated_bytes=self.allocated_bytes,
                   device_total_bytes=self.device_total_bytes, host_bytes=self.host_bytes, gpu=self.gpu,
                   gpu_memory_bytes=self.gpu_memory_bytes, fits=self.fits, margin_bytes=self.margin_bytes,
                   note=self.note)
        return row


def rank_row(spec: ModelSpec, setup: RunSetup, world_size: int, strategy: Strategy | None,
             options: Mapping[str, Any], gpu: Any = None) -> RankRow:
    """One rank of ``setup`` on ``world_size`` ranks under ``strategy`` (``analytic.fit.on_world``), or the n/a row
    saying why the estimator does not model it. ``gpu``: an ``analytic.fit.Gpu`` to check the fit against."""
    from .analytic import estimate
    from .analytic.fit import check_fit, on_world
    from .analytic.ranks import one_device_setup

    key = setup_row(spec, setup.on_one_device())
    if world_size == 1:
        strategy = None
    offload = options.get("offload") if strategy is not None else None
    try:
        setup = on_world(setup, world_size, {**options, "strategy": strategy})
        est = estimate(spec, setup)
    except (ConfigError, UnsupportedModelError) as exc:
        return RankRow(key, world_size, strategy.value if strategy else None,
                       str(offload) if offload not in (None, "none") else None, "n/a",
                       note=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    par = setup.parallel
    fit = check_fit(est, gpu) if gpu is not None else None
    regime = one_device_setup(setup).effective_regime.value if par is not None else None
    return RankRow(
        key, world_size, par.strategy.value if par else None,
        par.offload.value if par is not None and par.offload.value != "none" else None, "ok",
        total_params=est.total_params, trainable_params=est.trainable_params, peak_bytes=est.peak_bytes,
        peak_phase=est.peak_phase.value, allocated_bytes=est.device.allocated_bytes,
        device_total_bytes=est.device.device_total_bytes, host_bytes=est.host_bytes,
        gpu=gpu.name if gpu is not None else None, gpu_memory_bytes=gpu.memory_bytes if gpu is not None else None,
        fits=fit.fits if fit else None, margin_bytes=fit.margin_bytes if fit else None,
        estimate_notes=tuple(n for n in est.notes if not n.startswith("per rank of")),
        rank_regime=regime if regime != key["regime"] else None)


def rank_rows(spec: ModelSpec, setups: Sequence[RunSetup], plan: WorldPlan, gpu: Any = None) -> list[RankRow]:
    """Every planned run (``sweep.plan_setups``, one device) on every world size and strategy of ``plan``.

    Returns:
        Rows in the order of ``setups`` (methods innermost), each run's one-device row first, then one row per
        strategy and world size (sizes in the order given).
    """
    rows = []
    for setup in setups:
        if 1 in plan.world_sizes:
            rows.append(rank_row(spec, setup, 1, None, plan.options, gpu))
        for strategy in plan.strategies:
            rows += [rank_row(spec, setup, n, strategy, plan.options, gpu) for n in plan.world_sizes if n != 1]
    return rows


def smallest_fitting(rows: Sequence[RankRow]) -> list[str]:
    """One line per run (same model, size and precision) and method: the smallest world size listed at which one
    rank fits the GPU, per strategy ('full: fsdp 4, zero3 8; lora: one device'). Empty without a GPU."""
    if not any(r.fits is not None for r in rows):
        return []
    groups: dict[tuple, dict[str, list[RankRow]]] = {}
    for r in rows:
        groups.setdefault(group_of(r.setup), {}).setdefault(r.setup["method"], []).append(r)
    lines = []
    for group, methods in groups.items():
        parts = []
        for method, mine in methods.items():
            if any(r.world_size == 1 and r.fits for r in mine):
                parts.append(f"{method}: one device")
                continue
            answers = []
            for strategy in dict.fromkeys(r.strategy for r in mine if r.strategy is not None):
                fitting = [r.world_size for r in mine if r.strategy == strategy and r.fits]
                answers.append(f"{strategy} {min(fitting)}" if fitting else f"{strategy} none listed")
            parts.append(f"{method}: " + (", ".join(answers) or "none listed"))
        label = ""
        if len(groups) > 1:
            shown = dict(zip(GROUP_COLUMNS, group))
            precision = shown["dtype"] if shown["regime"] == shown["dtype"] else f"{shown['dtype']} {shown['regime']}"
            label = (f" at b={shown['batch_size']} s={shown['seq_len']} {precision}"
                     + (" ckpt" if shown["grad_checkpointing"] else ""))
        gpu = next(r.gpu for r in rows if r.gpu)
        lines.append(f"smallest world size listed that fits {gpu}{label}: " + "; ".join(parts))
    return lines
