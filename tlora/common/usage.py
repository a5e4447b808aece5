"""Bad input: the error every command reports as one line, the parser that raises it, and shared checks.

Every command (train.py, inference.py, evaluate, analyze, benchmark, demo) parses with `Parser`, checks
its input before loading any model, and reports a `UsageError` as `error: <message>` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import reprlib
import sys
from pathlib import Path
from typing import Any

import yaml

from tlora.common.errors import UsageError, first_line
from tlora.common.messages import DIFFUSERS_LAYOUT

SECRET_FLAGS = ("--wandb_api_key",)
SECRET_KEYS = tuple(flag.lstrip("-") for flag in SECRET_FLAGS)  # the same, as config and hparams.yml keys
SECRET_ENV = ("WANDB_API_KEY",)
REDACTED = "<redacted>"
MAX_TEXT_FILE = 16 * 2**20  # a --config, hparams.yml or manifest larger than this is not one

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def shown(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters, at a cost bounded whatever the value (a YAML alias bomb is a
    list nested a hundred times: its full repr would take minutes)."""
    return _SHORT.repr(value)


def read_text(path: str | Path, what: str, fix: str) -> str:
    """A user's text file (a --config, a hparams.yml, a manifest) as UTF-8 text; one line naming `what` and
    `fix` when it cannot be read, is not UTF-8 text or is larger than any such file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_FILE + 1)
    except OSError as err:
        raise UsageError(f"{what}: cannot read {path} ({err.strerror or err}); {fix}") from None
    if len(data) > MAX_TEXT_FILE:
        raise UsageError(f"{what}: {path} is over {MAX_TEXT_FILE >> 20} MiB, too large for a text file of settings; "
                         f"{fix}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what}: {path} is not UTF-8 text; {fix}") from None


def parse_json(text: str) -> Any:
    """JSON text as Python values; ValueError for anything else (nesting too deep for Python included)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | Path, what: str, fix: str) -> dict:
    """A JSON object from a file (a config, a manifest): UTF-8, size-bounded; one line naming `what`, the file and
    `fix` when it cannot be read, is not UTF-8 or not JSON, or holds something other than an object."""
    text = read_text(path, what, fix)
    try:
        value = parse_json(text)
    except ValueError as err:  # not JSON: say where, in words
        where = f" at line {err.lineno}" if hasattr(err, "lineno") else ""
        raise UsageError(f"{what}: {path} is not valid JSON{where}; {fix}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what}: {path} does not hold a JSON object of settings; {fix}")
    return value


def check_utf8(flag: str, text: str) -> None:
    """Text from the command line that encodes as UTF-8 (Python keeps invalid bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag}: the text is not valid UTF-8; give it as UTF-8 text") from None


def _is_secret_flag(name: str) -> bool:
    """`--wandb_api_key` and anything that could be read as it (prefixes, hyphens for underscores)."""
    name = name.replace("-", "_")
    return len(name) > 3 and any(flag.replace("-", "_").startswith(name) for flag in SECRET_FLAGS)


def secret_values(argv: list[str]) -> set[str]:
    """The values given to secret flags in `argv`, however spelled, and the secret environment variables."""
    values = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or not _is_secret_flag(name):
            continue
        if eq:
            values.add(value)
        elif i + 1 < len(argv):
            values.add(argv[i + 1])
    return {v for v in values if v}


def redact(text: str, secrets: set[str]) -> str:
    """A message with every secret value replaced by <redacted>, wherever it appears (messages are shown,
    not read back; recorded settings use `redact_value` and `redact_argv`, which never touch other values)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact_value(value, secrets: set[str]):
    """A recorded setting with a value that is exactly a secret replaced (nothing else is changed)."""
    return REDACTED if isinstance(value, str) and value in secrets else value


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the values of secret flags (`--flag value`, `--flag=value`, however spelled) and any
    argument that is exactly a secret replaced; other arguments are kept as they are."""
    secrets, out = secret_values(argv), []
    for i, arg in enumerate(argv):
        name, eq, _ = arg.partition("=")
        if eq and name.startswith("--") and _is_secret_flag(name):
            arg = f"{name}={REDACTED}"
        elif i and argv[i - 1].startswith("--") and "=" not in argv[i - 1] and _is_secret_flag(argv[i - 1]):
            arg = REDACTED
        out.append(redact_value(arg, secrets))
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help text wrapped at spaces only, so that names like diffusers-scheduled or timestep:T stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _StoreOnce(argparse._StoreAction):
    """argparse's store, refusing a flag (or another name of it) given again with another value: plain argparse
    keeps the last one in silence."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "given", None)
        if given is not None and option_string is not None:
            if self.dest in given and given[self.dest][1] != values:
                first, before = given[self.dest]
                parser.error(f"{option_string} {shown(values)} contradicts {first} {shown(before)} given before; "
                             "give the flag once")
            given.setdefault(self.dest, (option_string, values))
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations, no flag given twice with two values and only UTF-8 text, whose errors are
    one-line `UsageError`s with secrets redacted. `given` maps each flag given on the command line to
    (the name used, its value)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)
        self._argv: list[str] = []
        self.given: dict[str, tuple[str, Any]] = {}

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        self.given = {}
        for i, arg in enumerate(self._argv):
            flag = arg.partition("=")[0] if arg.startswith("--") else (self._argv[i - 1] if i else "argument")
            check_utf8(flag if flag.startswith("--") else "argument", arg)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        raise UsageError(redact(f"{message}; run with --help to see the flags", secret_values(self._argv)))


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
        raise UsageError(f"{flag} must be a finite number in {span}, got {shown(value)}; pass one in that range")


def check_at_least(flag: str, value: int, low: int = 1) -> None:
    """A count of at least `low`."""
    if value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}; pass {low} or more")


MAX_SEED = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy too)
MAX_GUIDANCE = 100.0  # far above any model's useful guidance; beyond it the guided prediction overflows half precision


def check_seed(flag: str, value: int, processes: int = 1) -> None:
    """A seed every generator takes: 0 to 2**32 - 1, leaving room for one more per process (each process seeds
    with seed + its index)."""
    high = MAX_SEED - (processes - 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise UsageError(f"{flag} must be a whole number from 0 to {high}, got {shown(value)}; pass one in that range")


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                kind = type(key).__name__.replace("dict", "mapping")
                raise yaml.constructor.ConstructorError(None, None, f"a {kind} cannot be a key",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {shown(key)} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str, fix: str = "fix the file") -> object:
    """A user's YAML file (a --config, a hparams.yml, a benchmark manifest): safe types only, no key given twice;
    errors are one line naming the file, the line and `fix`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{where} is not valid YAML{line} ({getattr(err, 'problem', None) or 'unreadable'}); "
                         f"{fix}") from None
    except (RecursionError, ValueError):  # nested too deeply, a number of thousands of digits
        raise UsageError(f"{where} holds values nested too deeply or numbers too long to read; {fix}") from None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(flag: str, name: str, needs: str = "model_index.json", revision: str | None = None) -> None:
    """A local folder holding `needs`, or a hub id that can be had: cached when HF_HUB_OFFLINE is set.

    Online, a hub id is not looked up here (that would be a network call); a load that then fails is
    reported in one line by the caller.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not (path / needs).is_file():
            raise UsageError(f"{flag}: {name} has no {needs}; {DIFFUSERS_LAYOUT}")
        return
    if not HUB_ID.match(name):
        raise UsageError(f"{flag}: {name} does not exist; pass a local folder or a hub id like org/model")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, needs, revision=revision), str):
            raise UsageError(
                f"{flag}: {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"download it first (hf download {name}) or pass a local folder"
            )


def model_load_error(flag: str, name: str, err: Exception) -> UsageError:
    """One line for a model that could not be loaded (not found, no network, no access)."""
    return UsageError(f"{flag}: could not load {name} ({first_line(err)}); pass a local folder or check the name and "
                      "network")


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
