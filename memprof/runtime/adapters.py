"""memprof's own PEFT methods: bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) and BitFit.

peft has neither. Adapters are attached with forward hooks so the base model's module names and
state_dict keys stay unchanged (a pretrained checkpoint still loads) and the adapter weights live in a
``memprof_adapters`` ModuleDict on each block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterSpec, AdapterVariant
from ..errors import ConfigError

# Output projection of the attention block and of the FFN, per HF model_type (the module the adapter follows).
ADAPTER_SITES: dict[str, tuple[str, str]] = {
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma2": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma3_text": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "opt": ("self_attn.out_proj", "fc2"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    # sparse MoE blocks: the FFN adapter follows the whole block (router, experts, shared expert), whose output
    # is the FFN's output there
    "mixtral": ("self_attn.o_proj", "mlp"),
    "qwen2_moe": ("self_attn.o_proj", "mlp"),
    "olmoe": ("self_attn.o_proj", "mlp"),
}


class BottleneckAdapter(nn.Module):
    """y = x + up(act(down(x))), down: h -> r, up: r -> h, both with bias; up starts at zero (near identity).

    The adapter weights may be kept in fp32 on a half-precision base (as peft does for its adapters): the
    input is cast to the adapter dtype and the result back to the input dtype.
    """

    def __init__(self, hidden_size: int, bottleneck: int, activation: str = "relu",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden_size, dtype=dtype, device=device)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        if not self.up.weight.is_meta:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(self.down.weight.dtype)
        return x + self.up(self.act(self.down(z))).to(x.dtype)


def _block_list(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of a transformers model (the largest ModuleList)."""
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ConfigError("cannot find the transformer blocks of this model to place adapters")
    return best


def add_bottleneck_adapters(model: nn.Module, model_type: str, hidden_size: int, spec: AdapterSpec,
                            dtype: torch.dtype = torch.float32) -> int:
    """Attach adapters after the attention and/or FFN output projections of every block.

    Returns:
        the number of adapters added.

    Raises:
        ConfigError: the model type has no known adapter placement.
    """
    if model_type not in ADAPTER_SITES:
        raise ConfigError(f"bottleneck adapter placement is not known for model_type '{model_type}'; "
                          f"supported: {', '.join(sorted(ADAPTER_SITES))}")
    attn_site, ffn_site = ADAPTER_SITES[model_type]
    sites = [("attn", attn_site), ("ffn", ffn_site)] if spec.variant is AdapterVariant.houlsby else [("ffn", ffn_site)]
    r = spec.bottleneck_size(hidden_size)
    count = 0
    for block in _block_list(model):
        device = next(block.parameters()).device
        adapters = nn.ModuleDict()
        for key, site in sites:
            target = block.get_submodule(site)
            adapter = BottleneckAdapter(hidden_size, r, spec.activation, dtype=dtype, device=device)
            adapters[key] = adapter
            target.register_forward_hook(_make_hook(adapter))
            count += 1
        block.memprof_adapters = adapters
    return count


def _make_hook(adapter: BottleneckAdapter):  # noqa: ANN202
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return adapter(output)
    return hook


def is_norm_module(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()
