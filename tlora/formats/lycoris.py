"""SimpleTuner / LyCORIS T-LoRA files (`lycoris_*` keys, `lycoris_config` metadata) in tlora.

LyCORIS saves Q, P, lambda and its alpha, but not the frozen start: at load time it rebuilds P0, L0, Q0
from an SVD of the base model's weight (`TLoraModule.make_module_from_state_dict`). We call that same
LyCORIS function on the same base layers and run the result through tlora's adapters, so the output is
the one LyCORIS gives (to float rounding), under the mask SimpleTuner applies: max_rank = `linear_dim`,
min_rank = `tlora_min_rank` (default 1), alpha = `tlora_alpha` (default 1), scale = linear_alpha / rank,
and r(t) rounded as LyCORIS's compute_timestep_mask rounds it (rank rule "float64"). The settings are read by
tlora.runs.reading like every other file's.

Keys are LyCORIS's own (a format of its own, so they are taken apart here, not in tlora.runs.keys):
`lycoris_<module path, "." as "_">.<tensor>`, its TLoraModule's tensors Q, P, lambda and alpha (PARAMS).
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tlora.common.errors import UsageError
from tlora.common.values import shown, typed_value
from tlora.method.adapters import OrthoLoRAAdapter
from tlora.method.denoiser import DenoiserSpec
from tlora.method.injection import TLoRA, attach_adapters
from tlora.method.settings import TLoRASettings

PREFIX = "lycoris_"
OTHER_MODEL_FIX = "load it on the base model it was trained on"  # a file made for another model
RESAVE = "save it again with SimpleTuner"  # a file SimpleTuner would not have written
PARAMS = ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha")  # LyCORIS TLoraModule's, as it saves them
Q, P, LAMBDA, ALPHA = PARAMS


def is_lycoris(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def split_lycoris_key(key: str) -> tuple[str, str]:
    """(LyCORIS module name, tensor name)."""
    module, _, param = key.partition(".")
    return module, param


def lycoris_matrices(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Q and P, which must be matrices."""
    return {k: tuple(v) for k, v in shapes.items() if split_lycoris_key(k)[1] in (Q, P)}


def lycoris_rank(shapes: dict[str, tuple[int, ...]]) -> int:
    """The largest module rank (rows of Q) in a LyCORIS file's shapes (checked by `lycoris_matrices` first);
    1 if none."""
    return max((s[0] for k, s in lycoris_matrices(shapes).items() if split_lycoris_key(k)[1] == Q), default=1)


def _groups(weights: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        prefix, param = split_lycoris_key(key)
        if param not in PARAMS:
            raise UsageError(f"{where}: LyCORIS tensor {shown(key)} is not a T-LoRA parameter ({', '.join(PARAMS)}); "
                             "pass a SimpleTuner / LyCORIS T-LoRA file")
        groups.setdefault(prefix, {})[param] = value
    return groups


def check_module(where: str, prefix: str, linear: nn.Linear, params: dict[str, torch.Tensor]) -> None:
    """One LyCORIS module's tensors fit `linear`: Q (r x in), P (out x r), lambda (1 x r), alpha one number;
    one line naming the file otherwise (a file made for another model)."""
    rank = params[Q].shape[0] if params[Q].dim() == 2 else 0
    expected = {Q: (rank, linear.in_features), P: (linear.out_features, rank), LAMBDA: (1, rank)}
    for param, shape in expected.items():
        if tuple(params[param].shape) != shape or not 1 <= rank <= min(linear.in_features, linear.out_features):
            raise UsageError(f"{where}: LyCORIS module {shown(prefix)} has {param} of shape "
                             f"{tuple(params[param].shape)}, where this model's layer takes {shape}; it was made for "
                             f"another model: {OTHER_MODEL_FIX}")
    if params[ALPHA].numel() != 1:
        raise UsageError(f"{where}: LyCORIS module {shown(prefix)} has {params[ALPHA].numel()} alpha values, not "
                         f"one; {RESAVE}")


def adapter_from_lycoris(name: str, linear: nn.Linear, params: dict[str, torch.Tensor]) -> OrthoLoRAAdapter:
    """LyCORIS's own module rebuilt on `linear` (its frozen start from the SVD of linear's weight), as a
    tlora adapter; LyCORIS's scale alpha / rank is folded into P and P0."""
    from lycoris.modules.tlora import TLoraModule

    module = TLoraModule.make_module_from_state_dict(name, linear, *(params[p] for p in PARAMS))
    adapter = OrthoLoRAAdapter(linear.in_features, linear.out_features, module.lora_dim)
    with torch.no_grad():
        adapter.start(module.q_layer.weight, module.p_layer.weight * module.scale, module.lambda_layer,
                      frozen=(module.base_q, module.base_p * module.scale, module.base_lambda))
    return adapter


@contextmanager
def _without_full_collections():
    """LyCORIS runs a full gc.collect() for every module it builds (0.2 s each in a large process: minutes for
    an SDXL file); it has nothing to free here, so its module sees a no-op collect until we are done."""
    try:
        from lycoris.modules import tlora as module
    except ImportError:
        raise UsageError("LyCORIS T-LoRA files need the lycoris-lora package: pip install 'lycoris-lora>=4.1'") from None
    original = module.gc
    module.gc = SimpleNamespace(collect=lambda *args: 0)
    try:
        yield
    finally:
        module.gc = original


def load_lycoris(denoiser: nn.Module, weights: dict[str, torch.Tensor], settings: TLoRASettings, spec: DenoiserSpec,
                 where: str = "this LyCORIS file") -> TLoRA:
    """Attach a LyCORIS T-LoRA (its tensors, and the settings tlora.runs.reading read from its lycoris_config) to
    `denoiser`: any of its Linear layers that the file names (spec: how its timestep reaches t). `where` names the
    file in errors."""
    paths = {PREFIX + name.replace(".", "_"): name for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)}
    modules = dict(denoiser.named_modules())
    groups = _groups(weights, where)
    for prefix, params in groups.items():
        if prefix not in paths or set(params) != set(PARAMS):
            raise UsageError(f"{where}: LyCORIS module {shown(prefix)} has no Linear layer in this model (or misses "
                             f"tensors); {OTHER_MODEL_FIX}")
        check_module(where, prefix, modules[paths[prefix]], params)
    with _without_full_collections():
        adapters = {prefix: (paths[prefix], adapter_from_lycoris(prefix, modules[paths[prefix]], params))
                    for prefix, params in groups.items()}
    return attach_adapters(denoiser, settings, adapters, spec)


def known_from_lycoris(config: dict[str, Any], rank: int, where: str) -> dict[str, Any]:
    """SimpleTuner's mask settings from a lycoris_config, with LyCORIS's defaults (as SimpleTuner reads them)."""
    if config.get("algo", "tlora") != "tlora":
        raise UsageError(f"{where} holds LyCORIS algo {config.get('algo')!r}, not a T-LoRA (algo tlora); pass a "
                         "LyCORIS file with algo tlora")
    return {"trainer_type": "ortho_lora", "timestep_dependent": True, "rank_rule": "float64",
            "lora_rank": typed_value(where, "linear_dim", config.get("linear_dim") or rank, int),
            "min_rank": typed_value(where, "tlora_min_rank", config.get("tlora_min_rank", 1), int),
            "alpha_rank_scale": typed_value(where, "tlora_alpha", config.get("tlora_alpha", 1.0), float)}
