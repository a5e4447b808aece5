"""Checking and showing values: numbers in range, counts, seeds, guidance, devices, typed settings, and
how a value is echoed in a message (`shown`, bounded).
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from tlora.common.errors import UsageError

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def shown(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters, at a cost bounded whatever the value (a YAML alias bomb is a
    list nested a hundred times: its full repr would take minutes)."""
    return _SHORT.repr(value)


def check_finite(flag: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite number within [low, high] (open ends with *_open)."""
    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"  # infinity itself is never a finite number
    span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise out_of_range(flag, f"a finite number in {span}", value)


def out_of_range(flag: str, allowed: str, value: Any) -> UsageError:
    """`flag must be <allowed>, got <value>; pass one in that range`."""
    return UsageError(f"{flag} must be {allowed}, got {shown(value)}; pass one in that range")


def check_count(where: str, value: Any, fix: str = "pass 1 or more") -> None:
    """A whole number of at least 1 (not a bool, not a float, not text); `where` names the flag or key, `fix` is
    the message's last clause."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where} must be a whole number of at least 1, got {shown(value)}; {fix}")


MAX_SEED = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy too)
MAX_GUIDANCE = 100.0  # far above any model's useful guidance; beyond it the guided prediction overflows half precision


def check_seed(flag: str, value: int, processes: int = 1) -> None:
    """A seed every generator takes: 0 to 2**32 - 1, leaving room for one more per process (each process seeds
    with seed + its index)."""
    high = MAX_SEED - (processes - 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise out_of_range(flag, f"a whole number from 0 to {high}", value)


def check_guidance(flag: str, value: float) -> None:
    check_finite(flag, value, 0, MAX_GUIDANCE)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str | None, flag: str = "--device") -> str:
    """A device this machine has, of a type that computes (cpu, cuda, mps; `meta` holds no data); None gives
    cuda when there is a GPU, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag}: {shown(name)} is not a device; pass cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"{flag} {shown(name)}: tlora runs on {', '.join(DEVICE_TYPES)}; pass one of them")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} cuda: no CUDA GPU is available here; pass {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA devices; pass one of them")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} mps: no Apple GPU (MPS) is available here; pass {flag} cpu")
    return name


KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def typed_value(where: str, key: str, value: Any, kind: type) -> Any:
    """`value` as `kind` (strings from metadata are parsed); a one-line UsageError otherwise."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    elif kind is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, str):
        return value
    raise UsageError(f"{where}: {key} must be {kind.__name__}, got {shown(value)}; give it as {KIND_WORDS[kind]}")
