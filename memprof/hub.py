"""Resolve a model name to a ModelSpec: bundled preset, local config.json, or the Hugging Face hub (config only).

Lookup order: preset name or hub id of a preset -> local file or directory -> hub (``huggingface_hub``, only
when installed; offline or unknown ids give a clear error). Nothing here downloads weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedModelError
from .outputs import printable
from .presets import find_preset, preset_names
from .spec import ModelSpec, Task, from_hf_config, parse_config_json, synthesize_from_params


def load_hf_config(name_or_path: str) -> tuple[dict[str, Any], str, str]:
    """Read a model config. Returns (config dict, display name, source: preset | file | hub).

    Raises:
        ConfigError: a local file that is missing fields or is not valid JSON.
        UnsupportedModelError: the name is neither a preset, a local path, nor reachable on the hub.
    """
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name_or_path):
        raise ConfigError(f"model name '{printable(name_or_path)}' holds control characters")
    preset = find_preset(name_or_path)
    if preset is not None:
        canonical, cfg = preset
        return cfg, canonical, "preset"
    path = Path(name_or_path).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:  # a name too long for the file system, ...: not a path that exists
        raise ConfigError(f"model {name_or_path[:60]!r}... is neither a preset nor a readable path "
                          f"({exc.strerror or type(exc).__name__})") from None
    if is_dir:
        path = path / "config.json"
        is_file = path.is_file()
        if not is_file:
            raise ConfigError(f"directory {name_or_path} has no config.json")
    if is_file:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        return parse_config_json(text, str(path)), str(name_or_path), "file"
    if name_or_path.endswith(".json") or name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"config file {name_or_path} does not exist")
    return _load_from_hub(name_or_path), name_or_path, "hub"


def hub_endpoint() -> tuple[str, int]:
    """Host and port of the hub the client will use (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick DNS + TCP check of the hub endpoint, so an offline machine fails at once instead of after the
    client's retries (minutes); False under ``HF_HUB_OFFLINE``."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(hub_endpoint(), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_pretrained(source: str, *, what: str = "--pretrained", filename: str = "config.json") -> None:
    """``--pretrained``: a local folder, or a hub id that is cached or reachable; checked before any worker starts
    (transformers would otherwise retry an unreachable hub for minutes and fail inside the run).

    Raises:
        ConfigError: a hub id with no cached copy while the hub is unreachable.
    """
    try:
        if Path(source).expanduser().exists():
            return
    except OSError:
        pass
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, filename), str):
            return
    except Exception:  # noqa: BLE001 (not installed, or not a valid repo id: decided below)
        pass
    if not hub_reachable():
        host, _ = hub_endpoint()
        raise ConfigError(f"{what} {source!r} is not a local folder, not in the hub cache, and the hub "
                          f"({host}) is not reachable; give a local path or go online")


def _load_from_hub(repo_id: str) -> dict[str, Any]:
    hint = f"known presets: {', '.join(preset_names())}; or pass a local config.json"
    if repo_id.count("/") > 1 or not repo_id or any(c.isspace() for c in repo_id):
        raise UnsupportedModelError(f"'{repo_id}' is not a preset, a local config file or a hub model id; {hint}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UnsupportedModelError(
            f"'{repo_id}' is not a preset or a local file, and huggingface_hub is not installed to fetch its "
            f"config (pip install 'memprof[measure]'); {hint}"
        ) from None
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # the client logs every retry; memprof reports one line instead
    try:
        try:
            path = hf_hub_download(repo_id, "config.json", local_files_only=True)
        except Exception:  # not in the local cache
            if not hub_reachable():
                raise UnsupportedModelError(
                    f"'{repo_id}' is not a preset, a local file or in the hub cache, and the hub is not reachable; "
                    f"{hint}") from None
            try:
                path = hf_hub_download(repo_id, "config.json")
            except Exception as exc:  # unknown or gated repo, network error: all mean "cannot get the config"
                raise UnsupportedModelError(
                    f"cannot get the config of '{repo_id}' from the hub ({type(exc).__name__}); {hint}") from None
    finally:
        hub_log.setLevel(level)
    return parse_config_json(Path(path).read_text(), f"config.json of {repo_id}")


def _check_num_labels(num_labels: int | None) -> None:
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                   or not 1 <= num_labels <= 1 << 20):
        raise ConfigError(f"--num-labels must be an integer between 1 and {1 << 20}, got {num_labels!r}")


def resolve_spec(model: str | None = None, params: float | None = None, task: Task | None = None,
                 num_labels: int | None = None) -> tuple[ModelSpec, str | None]:
    """The ModelSpec for a model name/path or a parameter count, and a note on what was assumed.

    Exactly one of ``model`` and ``params`` must be given. For ``params`` the note names the real
    LLaMA shape that was scaled.
    """
    if (model is None) == (params is None):
        raise ConfigError("give a model (preset, hub id or config.json) or --params N, not both")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model must be a preset name, hub id or config.json path (a string), got {model!r}")
    if params is not None and (isinstance(params, bool) or not isinstance(params, (int, float))):
        raise ConfigError(f"params must be a number of parameters (3e9), got {params!r}")
    _check_num_labels(num_labels)
    if params is not None:
        spec, ref = synthesize_from_params(params)
        note = (f"--params {params:.3g}: LLaMA-like shape scaled from {ref}: h={spec.hidden_size}, "
                f"layers={spec.num_layers}, heads={spec.num_heads} (kv {spec.num_kv_heads}), "
                f"intermediate={spec.intermediate_size}, vocab={spec.vocab_size}, "
                f"{'tied' if spec.tie_embeddings else 'untied'} embeddings")
        if task is not None and task is not spec.task:
            spec = spec.with_task(task, num_labels)
        return spec, note
    assert model is not None
    cfg, name, source = load_hf_config(model)
    return from_hf_config(cfg, name, source, task=task, num_labels=num_labels), None


def load_spec_any(model: str, task: Task | None = None, num_labels: int | None = None) -> ModelSpec:
    """Like resolve_spec for a name, but keeps architectures outside the analytic families (for --trace).

    The returned spec has family ``other`` and only the numbers the config states; its hf_config is what
    the traced estimator builds.
    """
    from .spec import Family, config_num_labels, default_task, _get  # noqa: PLC0415 (internal helpers)

    _check_num_labels(num_labels)

    cfg, name, source = load_hf_config(model)
    try:
        return from_hf_config(cfg, name, source, task=task, num_labels=num_labels)
    except UnsupportedModelError:
        if not cfg.get("model_type"):
            raise
    text = cfg.get("text_config") or cfg
    h = _get(text, "hidden_size", "n_embd", "d_model", "dim", default=1)
    a = _get(text, "num_attention_heads", "n_head", "num_heads", "n_heads", default=1)
    return ModelSpec(
        name=name, model_type=cfg["model_type"], family=Family.other,
        vocab_size=int(_get(text, "vocab_size", default=1)), hidden_size=int(h),
        num_layers=int(_get(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=1)),
        num_heads=int(a), num_kv_heads=int(a), head_dim=max(1, int(h) // int(a)),
        intermediate_size=int(_get(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * int(h)) or 4 * int(h)),
        max_positions=int(_get(text, "max_position_embeddings", "n_positions", default=2048)),
        task=task or default_task(cfg), num_labels=num_labels or config_num_labels(cfg), source=source, hf_config=dict(cfg),
    )
