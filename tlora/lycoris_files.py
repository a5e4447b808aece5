"""SimpleTuner / LyCORIS T-LoRA files (`lycoris_*` keys, `lycoris_config` metadata) in tlora.

LyCORIS saves Q, P, lambda and its alpha, but not the frozen start: at load time it rebuilds P0, L0, Q0
from an SVD of the base model's weight (`TLoraModule.make_module_from_state_dict`). We call that same
LyCORIS function on the same base layers and run the result through tlora's adapters, so the output is
the one LyCORIS gives (to float rounding), under the mask SimpleTuner applies: max_rank = `linear_dim`,
min_rank = `tlora_min_rank` (default 1), alpha = `tlora_alpha` (default 1), scale = linear_alpha / rank.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from .adapters import OrthoLoRAAdapter
from .injection import MaskState, TLoRA, attach_adapters
from .usage import UsageError

PREFIX = "lycoris_"
PARAMS = ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha")


def is_lycoris(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def lycoris_settings(metadata: dict[str, str], weights: dict[str, torch.Tensor]) -> dict:
    """The mask settings SimpleTuner trained with, from the file's lycoris_config (with its defaults)."""
    try:
        config = json.loads(metadata.get("lycoris_config") or "{}")
    except ValueError:
        raise UsageError("this LyCORIS file's lycoris_config metadata is not JSON") from None
    if config.get("algo", "tlora") != "tlora":
        raise UsageError(f"this LyCORIS file holds algo {config.get('algo')!r}, not a T-LoRA (algo tlora)")
    rank = max(v.shape[0] for k, v in weights.items() if k.endswith(".q_layer.weight"))
    return {"max_rank": int(config.get("linear_dim") or rank), "min_rank": int(config.get("tlora_min_rank", 1)),
            "alpha": float(config.get("tlora_alpha", 1.0))}


def _groups(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        prefix, _, param = key.partition(".")
        if param not in PARAMS:
            raise UsageError(f"LyCORIS tensor {key!r} is not a T-LoRA parameter ({', '.join(PARAMS)})")
        groups.setdefault(prefix, {})[param] = value
    return groups


def adapter_from_lycoris(name: str, linear: nn.Linear, params: dict[str, torch.Tensor]) -> OrthoLoRAAdapter:
    """LyCORIS's own module rebuilt on `linear` (its frozen start from the SVD of linear's weight), as a
    tlora adapter; LyCORIS's scale alpha / rank is folded into P and P0."""
    try:
        from lycoris.modules.tlora import TLoraModule
    except ImportError:
        raise UsageError("LyCORIS T-LoRA files need the lycoris-lora package: pip install 'lycoris-lora>=4.1'") from None
    module = TLoraModule.make_module_from_state_dict(
        name, linear, params["q_layer.weight"], params["p_layer.weight"], params["lambda_layer"], params["alpha"])
    rank = module.lora_dim
    adapter = OrthoLoRAAdapter(linear.in_features, linear.out_features, rank, init=False)
    with torch.no_grad():
        adapter.q_layer.weight.copy_(module.q_layer.weight)
        adapter.p_layer.weight.copy_(module.p_layer.weight * module.scale)
        adapter.lambda_layer.copy_(module.lambda_layer)
        adapter.base_q.weight.copy_(module.base_q)
        adapter.base_p.weight.copy_(module.base_p * module.scale)
        adapter.base_lambda.copy_(module.base_lambda)
    return adapter


def load_lycoris(unet: nn.Module, weights: dict[str, torch.Tensor], metadata: dict[str, str],
                 num_train_timesteps: int = 1000) -> TLoRA:
    """Attach a LyCORIS T-LoRA to `unet` (any of its Linear layers that the file names)."""
    cfg = lycoris_settings(metadata, weights)
    paths = {PREFIX + name.replace(".", "_"): name for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
    adapters = {}
    for prefix, params in _groups(weights).items():
        if prefix not in paths or set(params) != set(PARAMS):
            raise UsageError(f"LyCORIS module {prefix!r} has no Linear layer in this model (or misses tensors)")
        linear = dict(unet.named_modules())[paths[prefix]]
        adapters[prefix] = (paths[prefix], adapter_from_lycoris(prefix, linear, params))
    state = MaskState(cfg["max_rank"], cfg["min_rank"], cfg["alpha"], num_train_timesteps, timestep_dependent=True)
    return attach_adapters(unet, state, adapters)
