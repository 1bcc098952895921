"""Library versions: the ones memprof was tested with, the installed ones, and the combinations the installed
libraries refuse to run (pure: stdlib only; reads installed package metadata, never imports torch or
transformers).

The analytic scripts mirror specific library code (analytic/forward.py, analytic/families/*.py name the files
and versions); ``constraints.txt`` pins the set the test suite and the validation passed with, and
``benchmarks/drift.py`` checks newer releases. A refusal is a combination that a library rejects on purpose
(an explicit ``raise`` in its code): memprof reports it in one line naming the library, its version and its
reason, instead of a traceback, and sweeps record it as ``n/a``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from .config import EXPERTS_TARGET, LORA_FAMILY, AttnImpl, LoraSpec, Method, RunSetup, is_expert_target
from .errors import ConfigError, DependencyMissingError, LibraryRefusalError
from .spec import ModelSpec, Task

# The versions of constraints.txt (a test keeps the two equal). README "Install" names them too.
TESTED_VERSIONS: dict[str, str] = {
    "torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "accelerate": "1.15.0",
}
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


@functools.cache
def installed_version(library: str) -> str | None:
    """The installed distribution's version (``2.13.0+cpu`` for the CPU wheel), or None when not installed."""
    from importlib import metadata  # only when a rule needs it: keeps `memprof estimate` fast

    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    return {lib: installed_version(lib) for lib in LIBRARIES}


def version_tuple(version: str) -> tuple[int, ...]:
    """'5.24.0' -> (5, 24, 0); '2.13.0+cpu' -> (2, 13, 0); '0.22.0.dev0' -> (0, 22, 0) (pre-releases count as
    their release: a rule stated for 5.24 covers 5.24.0rc1)."""
    release = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("v"))
    if release is None:
        raise ValueError(f"not a version: {version!r}")
    parts = [int(p) for p in release.group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
        "==": lambda a, b: a == b}


def satisfies(version: str | None, specifier: str) -> bool:
    """``satisfies('5.24.0', '>=5.24')``; comma-separated clauses must all hold; None (not installed) never does."""
    if version is None:
        return False
    have = version_tuple(version)
    for clause in specifier.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|>|<)\s*([0-9][0-9A-Za-z.+]*)\s*", clause)
        if m is None:
            raise ValueError(f"not a version specifier: {clause!r}")
        if not _OPS[m.group(1)](have, version_tuple(m.group(2))):
            return False
    return True


@dataclass(frozen=True)
class KnownRefusal:
    """A combination a library refuses while ``when`` holds for the library versions (all clauses)."""

    raised_by: str                         # the library whose code raises
    methods: tuple[Method, ...]
    tasks: tuple[Task, ...] | None         # None: every task
    model_types: tuple[str, ...] | None    # None: every architecture
    when: tuple[tuple[str, str], ...]      # (library, specifier): the versions where it refuses
    reason: str                            # the library's own message
    cause: str                             # what changed, read from the libraries' source

    def matches(self, spec: ModelSpec, setup: RunSetup) -> bool:
        return (setup.method in self.methods and (self.tasks is None or spec.task in self.tasks)
                and (self.model_types is None or spec.model_type in self.model_types))

    def holds_for(self, versions: dict[str, str | None]) -> bool:
        return all(satisfies(versions.get(lib), spec) for lib, spec in self.when)

    def condition(self) -> str:
        return " with ".join(f"{lib} {spec}" for lib, spec in self.when)


KNOWN_REFUSALS: tuple[KnownRefusal, ...] = (
    # peft 0.21.2 peft_model.py, PeftModelForSequenceClassification._prefix_tuning_forward: the prefix goes in
    # as `past_key_values` only if the base model's or its backbone's forward() names that argument; from
    # transformers 5.24 every model's forward takes `cache` instead (deprecate_kwarg("past_key_values",
    # "5.40.0", new_name="cache")), so peft raises. Causal-LM prefix tuning passes the keyword through and runs.
    KnownRefusal(
        raised_by="peft", methods=(Method.prefix,), tasks=(Task.seq_cls,), model_types=None,
        when=(("transformers", ">=5.24"), ("peft", "<=0.21.2")),
        reason="Model does not support past key values which are required for prefix tuning.",
        cause="transformers 5.24 renamed the models' past_key_values argument to cache, which peft's "
              "sequence-classification prefix path does not look for",
    ),
)


def known_refusal(spec: ModelSpec, setup: RunSetup, versions: dict[str, str | None] | None = None
                  ) -> KnownRefusal | None:
    """The rule under which the libraries (installed ones unless ``versions``) refuse this run, if any."""
    for rule in KNOWN_REFUSALS:
        if rule.matches(spec, setup) and rule.holds_for(installed_versions() if versions is None else versions):
            return rule
    return None


def refusal_error(rule: KnownRefusal, spec: ModelSpec, setup: RunSetup,
                  versions: dict[str, str | None] | None = None) -> LibraryRefusalError:
    versions = installed_versions() if versions is None else versions
    others = ", ".join(f"{lib} {versions.get(lib)}" for lib, _ in rule.when if lib != rule.raised_by)
    version = versions.get(rule.raised_by) or "?"
    return refusal(rule.raised_by, version, f"{rule.reason.rstrip('.')} ({rule.cause})",
                   what=run_description(spec, setup) + (f" under {others}" if others else ""),
                   tested=tested_line(rule.when))


def refusal(library: str, version: str | None, reason: str, *, what: str, tested: str = "") -> LibraryRefusalError:
    """'peft 0.21.2 refuses prefix tuning on X (seq-cls) under transformers 5.24.0: <reason>; <tested> run it'."""
    message = f"{library} {version or '(version unknown)'} refuses {what}: {reason}"
    return LibraryRefusalError(message + (f"; {tested} run it" if tested else ""), library, version, reason)


def check_supported(spec: ModelSpec, setup: RunSetup) -> None:
    """Raise the refusal of the installed libraries for this run, before anything is built.

    Raises:
        LibraryRefusalError: a KNOWN_REFUSALS rule holds for the installed versions.
    """
    rule = known_refusal(spec, setup)
    if rule is not None:
        raise refusal_error(rule, spec, setup)


def refusal_note(spec: ModelSpec, setup: RunSetup) -> str | None:
    """For the analytic estimate (which does not run the libraries): a note when some library versions refuse
    this run, saying whether the installed ones do."""
    for rule in KNOWN_REFUSALS:
        if not rule.matches(spec, setup):
            continue
        if rule.holds_for(installed_versions()):
            return (f"the installed libraries refuse this run ({refusal_error(rule, spec, setup)}); the estimate is "
                    f"of the run under {tested_line(rule.when)}, where it works")
        return (f"{rule.raised_by} refuses this run under {rule.condition()} ({rule.reason.rstrip('.')}: "
                f"{rule.cause})")
    return None


# Model types whose transformers 5.23 model class sets ``_supports_sdpa = False`` (modeling_*.py; a test checks the
# set against the installed classes, and traced and measured runs read the class itself: runtime.build).
# PreTrainedModel.get_correct_attn_implementation (modeling_utils.py) then falls back from the default SDPA to eager,
# and raises when SDPA is asked for explicitly.
NO_SDPA_TYPES = frozenset((
    'align', 'autoformer', 'bark', 'big_bird', 'bigbird_pegasus', 'bit', 'blip', 'bloom', 'bridgetower', 'bros',
    'canine', 'clap', 'clvp', 'codegen', 'convbert', 'convnext', 'convnextv2', 'cpmant', 'cvt', 'dab-detr', 'dac',
    'deberta', 'deberta-v2', 'deepseek_v4', 'dinat', 'dinov3_convnext', 'donut-swin', 'efficientnet', 'encodec',
    'falcon_mamba', 'fastspeech2_conformer', 'fastspeech2_conformer_with_hifigan', 'flaubert', 'flava', 'flint',
    'fnet', 'focalnet', 'fsmt', 'funnel', 'gemma2', 'gemma4_audio', 'git', 'glpn', 'got_ocr2', 'gpt_neo',
    'gpt_neox_japanese', 'gpt_oss', 'gptj', 'granite_swa', 'granitemoe_swa', 'grounding-dino', 'groupvit',
    'hgnet_v2', 'hiera', 'higgs_audio_v2_tokenizer', 'hy_v4', 'ibert', 'imagegpt', 'informer', 'inkling2',
    'inkling2_text', 'layoutlmv2', 'layoutlmv3', 'led', 'levit', 'lilt', 'longformer', 'longt5', 'luke', 'lxmert',
    'mamba', 'mamba2', 'markuplm', 'mask2former', 'maskformer', 'maskformer-swin', 'megatron-bert', 'mgp-str',
    'mimo_v2_flash', 'mm-grounding-dino', 'mobilenet_v1', 'mobilenet_v2', 'mobilevit', 'mobilevitv2', 'mpnet',
    'mpt', 'mra', 'mvp', 'nllb-moe', 'nystromformer', 'omdet-turbo', 'oneformer', 'openai-gpt',
    'openai_privacy_filter', 'patchtsmixer', 'pegasus_x', 'perceiver', 'poolformer', 'pp_ocrv6_medium_det',
    'pp_ocrv6_small_det', 'prophetnet', 'pvt', 'pvt_v2', 'reformer', 'regnet', 'rembert', 'resnet', 'roformer',
    'rwkv', 'seggpt', 'sew-d', 'speech_to_text', 'speecht5', 'splinter', 'squeezebert', 'swiftformer', 'swin2sr',
    'swinv2', 'switch_transformers', 't5gemma', 'table-transformer', 'tapas', 'textnet', 'time_series_transformer',
    'timesformer', 'tvp', 'univnet', 'uvdoc', 'vaultgemma', 'vibevoice_acoustic_tokenizer',
    'vibevoice_acoustic_tokenizer_decoder', 'vibevoice_acoustic_tokenizer_encoder', 'videoprism',
    'videoprism_vision_model', 'vilt', 'visual_bert', 'vitdet', 'vits', 'wavlm', 'xcodec', 'xglm', 'xlm', 'xlnet',
    'xlstm', 'yoso'
))
NO_SDPA_WHY = {"gemma2": "Gemma2PreTrainedModel sets _supports_sdpa = False: SDPA has no attention soft-capping"}


def attention_kernel(spec: ModelSpec, setup: RunSetup) -> AttnImpl:
    """The kernel a run asks for, ``auto`` resolved as transformers resolves it (NO_SDPA_TYPES); never raises
    (``resolve_attention`` refuses what transformers refuses). Records key runs by it."""
    if setup.attn_impl is not AttnImpl.auto:
        return setup.attn_impl
    return AttnImpl.eager if spec.model_type in NO_SDPA_TYPES else AttnImpl.sdpa


def resolve_attention(spec: ModelSpec, setup: RunSetup, supports_sdpa: bool | None = None,
                      why: str = "") -> tuple[RunSetup, str | None]:
    """The attention kernel the run will use, as transformers resolves ``attn_implementation``: ``auto`` (memprof's
    default, transformers' None) is SDPA where the model supports it and eager otherwise; an explicit ``sdpa`` on a
    model without SDPA is refused, as transformers refuses it. ``supports_sdpa``: the model class's own flag
    (traced and measured runs); None reads NO_SDPA_TYPES (the analytic estimate and the records, which import no
    transformers).

    Returns:
        (setup with attn_impl sdpa or eager, a note when the default fell back to eager).

    Raises:
        LibraryRefusalError: ``--attn sdpa`` on a model whose transformers class has no SDPA.
    """
    if setup.attn_impl is AttnImpl.eager:
        return setup, None
    if supports_sdpa is None:
        supports_sdpa = spec.model_type not in NO_SDPA_TYPES
        why = NO_SDPA_WHY.get(spec.model_type, f"the {spec.model_type} model class sets _supports_sdpa = False")
    if supports_sdpa:
        return (setup if setup.attn_impl is AttnImpl.sdpa else dataclasses.replace(setup, attn_impl=AttnImpl.sdpa)), None
    version = installed_version("transformers") or TESTED_VERSIONS["transformers"]
    if setup.attn_impl is AttnImpl.sdpa:
        raise refusal("transformers", version, f"{why or 'the model class has no SDPA'}; use --attn eager, or leave "
                      "--attn out for the kernel transformers picks", what=f"SDPA attention on {spec.name}")
    note = f"attention: eager, the kernel transformers {version} picks for {spec.model_type} ({why or 'no SDPA'})"
    return dataclasses.replace(setup, attn_impl=AttnImpl.eager), note


# LoRA on mixture-of-experts models. peft 0.21.2 LoraModel._prepare_adapter_config fills an unset target_modules
# from its per-model_type table, but on transformers 5 inject_adapter first runs its v4 -> v5 MoE conversion
# (utils/transformers_weight_conversion.py, _convert_peft_config_moe), which turns the unset targets into an empty
# set for mixtral and the model types converted like qwen2_moe (olmoe, ...): peft's own mixtral default (q_proj,
# v_proj) is lost and "No `target_modules` passed" is raised; qwen2_moe and the others have no entry at all. memprof
# passes the queries and values, peft's default for mixtral, llama, mistral and qwen2; the experts stay frozen
# (``--lora-targets q_proj,v_proj,experts`` adapts them too). A test applies each entry with peft.
LORA_MOE_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    mt: ("q_proj", "v_proj")
    for mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe")
}
# ``experts`` in --lora-targets: the fused expert weights of a transformers 5 MoE block (MixtralExperts,
# Qwen2MoeExperts, OlmoeExperts, ...: gate_up_proj (E, 2 * I, H) and down_proj (E, H, I)), as target_parameters
EXPERT_PARAMETERS: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")


@dataclass(frozen=True)
class LoraTargets:
    """What memprof hands peft's LoraConfig: ``modules`` (target_modules: names, "all-linear", or None for peft's
    own default) and ``parameters`` (target_parameters: fused expert weights), and a note when memprof chose them."""

    modules: tuple[str, ...] | str | None
    parameters: tuple[str, ...] = ()
    note: str | None = None


def lora_targets(spec: ModelSpec, setup: RunSetup) -> LoraTargets:
    """The LoRA-like method's targets for ``spec``: the [lora] targets split into modules and expert parameters,
    or, where none are given and peft has no default that works for the model type, LORA_MOE_DEFAULT_TARGETS.

    Raises:
        ConfigError: expert parameters named for a method other than LoRA / QLoRA (peft's target_parameters is
            LoRA's only).
    """
    lora = setup.lora or LoraSpec()
    if lora.targets is None:
        chosen = LORA_MOE_DEFAULT_TARGETS.get(spec.model_type)
        if chosen is None:
            return LoraTargets(None)
        version = installed_version("peft") or TESTED_VERSIONS["peft"]
        return LoraTargets(chosen, note=(
            f"LoRA targets: {', '.join(chosen)} in every block (peft {version} has no default that applies to "
            f"{spec.model_type} under transformers 5); the experts stay frozen: --lora-targets "
            f"{','.join(chosen)},{EXPERTS_TARGET} adapts them too"))
    names = [n for n in lora.targets if not is_expert_target(n)]
    params: list[str] = []
    for n in lora.targets:
        for p in (EXPERT_PARAMETERS if n == EXPERTS_TARGET else (n,) if is_expert_target(n) else ()):
            if p not in params:
                params.append(p)
    if params and setup.method not in (Method.lora, Method.qlora):
        raise ConfigError(f"{method_name(setup)} cannot adapt the fused expert weights ({', '.join(params)}): "
                          "peft targets parameters with LoRA only (LoraConfig target_parameters)")
    modules: tuple[str, ...] | str = "all-linear" if names == ["all-linear"] else tuple(names)
    return LoraTargets(modules, tuple(params))


def lora_target_note(spec: ModelSpec, setup: RunSetup) -> str | None:
    """The run note naming the LoRA targets memprof chose (LORA_MOE_DEFAULT_TARGETS), for a LoRA-like method."""
    return lora_targets(spec, setup).note if setup.method in LORA_FAMILY else None


def tested_line(libraries: tuple[tuple[str, str], ...] | None = None) -> str:
    names = [lib for lib, _ in libraries] if libraries else list(TESTED_VERSIONS)
    return "memprof's tested " + ", ".join(f"{lib} {TESTED_VERSIONS[lib]}" for lib in names if lib in TESTED_VERSIONS)


def method_name(setup: RunSetup) -> str:
    """How the method reads in a sentence ('prefix tuning', 'LoRA')."""
    if setup.method is Method.lora and setup.lora is not None and setup.lora.dora:
        return "DoRA"
    return {Method.prefix: "prefix tuning", Method.prompt: "prompt tuning", Method.lora: "LoRA",
            Method.qlora: "QLoRA", Method.ia3: "IA3", Method.bitfit: "BitFit", Method.adapter: "bottleneck adapters",
            Method.full: "full fine-tuning", Method.adalora: "AdaLoRA", Method.vera: "VeRA", Method.loha: "LoHa",
            Method.lokr: "LoKr", Method.ln_tuning: "LN tuning", Method.p_tuning: "P-tuning",
            Method.trainable_tokens: "trainable tokens"}[setup.method]


def run_description(spec: ModelSpec, setup: RunSetup) -> str:
    """'prefix tuning on FacebookAI/roberta-base (seq-cls)': what a refusal refuses."""
    return f"{method_name(setup)} on {spec.name} ({spec.task.value})"


def require_torch_stack(what: str) -> None:
    """One line instead of a ModuleNotFoundError when the torch stack is missing (a base install).

    Raises:
        DependencyMissingError: torch, transformers or peft is not installed.
    """
    from importlib.util import find_spec

    def absent(lib: str) -> bool:
        try:
            return find_spec(lib) is None
        except (ImportError, ValueError):  # blocked, or a broken install
            return True

    missing = [lib for lib in ("torch", "transformers", "peft") if absent(lib)]
    if missing:
        raise DependencyMissingError(f"{what} needs the torch stack ({', '.join(missing)} not installed): "
                                     "pip install 'memprof[measure]'")
