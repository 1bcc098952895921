"""``memprof compare --arm NAME=PATH``: saved peft configs as runs of a sweep, labelled with their names (pure).

Each config is mapped onto run options the way ``--peft-config`` is (peft_input.run_options), so an arm is a
RunSetup like any ``--methods`` entry: estimated, traced and measured alike, its records reused by later sweeps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from .comparison import key_of
from .config import RunSetup
from .errors import ConfigError
from .records import setup_row
from .spec import ModelSpec


def parse_arms(items: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``NAME=PATH`` pairs (``compare --arm``): each peft config read and mapped onto run options.

    Raises:
        ConfigError: not NAME=PATH, a repeated name, an unreadable config, or one the analytic model does not follow
            (its run could not be labelled or estimated: trace it with ``memprof trace --peft-config``).
    """
    from .peft_input import UnmodelledPeftConfig, load_peft_config, run_options

    out: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise ConfigError(f"--arm takes NAME=PATH (a peft config file or the directory save_pretrained wrote), "
                              f"got {item!r}")
        if any(not c.isprintable() for c in name) or len(name) > 64:
            raise ConfigError(f"--arm name {name!r} must be printable and at most 64 characters")
        if name in (n for n, _ in out):
            raise ConfigError(f"--arm name '{name}' is given twice; each arm needs its own name")
        try:
            options = run_options(load_peft_config(path.strip()))
        except UnmodelledPeftConfig as exc:
            reason = str(exc).split("; use --trace")[0]
            raise ConfigError(f"arm '{name}': {reason}; compare takes the configs memprof models (this one runs "
                              f"under memprof trace --peft-config {path.strip()})") from None
        out.append((name, options))
    return out


def arm_names(spec: ModelSpec, arms: Sequence[tuple[str, Mapping[str, Any]]],
              plan: Callable[[tuple[str, Mapping[str, Any]]], Sequence[RunSetup]]) -> dict[tuple, str]:
    """The runs each arm plans (``plan``: plan_setups for that arm alone), by their comparison key: its name.
    Two arms whose configs cost the same (same method and memory-relevant options) share one run and both names."""
    names: dict[tuple, str] = {}
    for arm in arms:
        for setup in plan(arm):
            key = key_of(setup_row(spec, setup))
            names[key] = names[key] + ", " + arm[0] if key in names and arm[0] not in names[key] else arm[0]
    return names


def labelled(row: Any, names: Mapping[tuple, str]) -> Any:
    """A comparison row whose run is an arm's, with the arm's name before its method ('dora-16 (lora)')."""
    name = names.get(key_of(row.setup))
    return row if name is None else replace(row, setup={**row.setup, "method": f"{name} ({row.setup['method']})"})
