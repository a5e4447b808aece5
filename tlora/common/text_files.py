"""Reading the small text files a user hands over (--config, hparams.yml, manifests, JSON configs): strict
UTF-8, bounded size, YAML with unique keys and no tags that run code, JSON without surprises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tlora.common.errors import UsageError
from tlora.common.values import shown

MAX_TEXT_FILE = 16 * 2**20  # a --config, hparams.yml or manifest larger than this is not one


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
    """A user's YAML file (a --config, a hparams.yml, a protocol manifest): safe types only, no key given twice;
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
