"""User text (prompts, tokens, concept and data names) made into one safe path component.

A name that is already safe stays as it is (so the authors' folder names are unchanged: `a sks riding a
bike`). Anything else (separators, `..`, control characters, leading dots, over-long text) is cleaned and
given a short hash of the original text, so two different texts never share a folder.
"""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 120  # bytes of UTF-8; file systems allow 255
UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def is_safe(name: str, max_length: int = MAX_LENGTH, reserved: frozenset[str] = frozenset()) -> bool:
    return (
        bool(name)
        and name not in reserved
        and not UNSAFE.search(name)
        and name.strip() == name
        and not name.startswith(".")
        and len(name.encode()) <= max_length
    )


def safe_component(text: str, max_length: int = MAX_LENGTH, reserved: frozenset[str] = frozenset(),
                   digest_of: str | None = None) -> str:
    """`text` itself when safe (and not one of the `reserved` names) and no `digest_of` is given, else a cleaned
    prefix plus `-<8 hex of sha256(digest_of, else text)>`."""
    if digest_of is None and is_safe(text, max_length, reserved):
        return text
    digest = hashlib.sha256((text if digest_of is None else digest_of).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cleaned = UNSAFE.sub("_", text).strip().lstrip(".").strip()
    keep = max_length - len(digest) - 1
    cleaned = cleaned.encode()[:keep].decode("utf-8", "ignore").rstrip()
    return f"{cleaned}-{digest}" if cleaned else digest
