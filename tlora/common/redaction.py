"""Secrets (the W&B key) never land on disk or in a message: which flags and variables hold one, and
redacting their values wherever they appear.
"""

from __future__ import annotations

import os

SECRET_FLAGS = ("--wandb_api_key",)
SECRET_KEYS = tuple(flag.lstrip("-") for flag in SECRET_FLAGS)  # the same, as config and hparams.yml keys
SECRET_ENV = ("WANDB_API_KEY",)
REDACTED = "<redacted>"


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
