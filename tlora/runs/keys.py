"""Our checkpoint keys, in one place: `<adapter prefix>.<parameter>`.

The prefix names the adapted layer as its family names it (`<attention>.processor.to_q_lora`, Family.layers); the
parameter is one of its adapter's own names (method.adapters.PARAMS: `down.weight`, `up.weight` for lora;
`q_layer.weight`, `p_layer.weight`, `lambda_layer` and the frozen copies `base_q.weight`, `base_p.weight`,
`base_lambda` for ortho_lora). The authors' files (SDXL safetensors, FLUX lora.pt) have the same keys; LyCORIS
files have keys of their own (tlora.formats.lycoris). Values may be tensors or shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from tlora.common.errors import CheckpointError
from tlora.method.adapters import PARAMS

V = TypeVar("V")
# every parameter name, the longest first (so that no name is taken for the end of a longer one)
NAMES = tuple(sorted({name for names in PARAMS.values() for name in names}, key=len, reverse=True))
MATRICES = frozenset(name for name in NAMES if name.endswith(".weight"))  # the Linear weights: 2-D
DOWN = {trainer_type: names[0] for trainer_type, names in PARAMS.items()}  # trained down projection, r x in
UP = {trainer_type: names[1] for trainer_type, names in PARAMS.items()}  # trained up projection, out x r


def split_key(key: str) -> tuple[str, str] | None:
    """(adapter prefix, parameter name) of one of our keys; None for a key that is not ours."""
    for name in NAMES:
        if key.endswith("." + name) and len(key) > len(name) + 1:
            return key[: -len(name) - 1], name
    return None


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}"


def not_ours(keys: Iterable[str]) -> list[str]:
    """The keys that name no adapter parameter."""
    return [key for key in keys if split_key(key) is None]


def group(tensors: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """Adapter prefix -> {parameter name: value}, in the order the keys come; a key that is not ours is a
    ValueError (the reader refuses such files)."""
    adapters: dict[str, dict[str, V]] = {}
    for key, value in tensors.items():
        parts = split_key(key)
        if parts is None:
            raise ValueError(f"{key!r} is not a T-LoRA checkpoint key (<adapter>.<{'|'.join(NAMES)}>)")
        adapters.setdefault(parts[0], {})[parts[1]] = value
    return adapters


def flatten(adapters: Mapping[str, Mapping[str, V]]) -> dict[str, V]:
    """The inverse of `group`: one flat dict of keys."""
    return {join_key(prefix, name): value for prefix, params in adapters.items() for name, value in params.items()}


def without_adapters(tensors: Mapping[str, V], dropped: Callable[[str], bool]) -> dict[str, V]:
    """`tensors` less the parameters of the adapters whose prefix `dropped` names (keys not ours stay)."""
    return {k: v for k, v in tensors.items() if (parts := split_key(k)) is None or not dropped(parts[0])}


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def matrices(shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the parameters that are matrices (the Linear weights)."""
    return {k: _shape(v) for k, v in shapes.items() if (parts := split_key(k)) and parts[1] in MATRICES}


def infer_trainer_type(keys: Iterable[str], where: str = "checkpoint") -> str:
    """`ortho_lora` or `lora`, read off the parameter names (one line naming `where` when neither)."""
    found = {parts[1] for key in keys if (parts := split_key(key))}
    for trainer_type in ("ortho_lora", "lora"):
        if DOWN[trainer_type] in found:
            return trainer_type
    raise CheckpointError(f"{where} has neither {DOWN['ortho_lora']} nor {DOWN['lora']} tensors, so it is not a "
                          "T-LoRA checkpoint; pass a T-LoRA checkpoint")


def layer_ranks(shapes: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Adapter prefix -> (rank, in_features, out_features), read off the trained down and up shapes."""
    out = {}
    for prefix, params in group({k: v for k, v in shapes.items() if split_key(k)}).items():
        for trainer_type in PARAMS:
            if DOWN[trainer_type] in params and UP[trainer_type] in params:
                rank, in_features = _shape(params[DOWN[trainer_type]])
                out[prefix] = (rank, in_features, _shape(params[UP[trainer_type]])[0])
    return out


def infer_rank(shapes: Mapping[str, Any]) -> int:
    """The largest adapter rank in the file (= lora_rank): the most rows of a trained down projection."""
    downs = set(DOWN.values())
    return max(_shape(v)[0] for k, v in shapes.items() if (parts := split_key(k)) and parts[1] in downs)
