"""Prompt rules shared by training, generation and evaluation: splitting, the base prompt, and checks."""

from __future__ import annotations

import string

from tlora.common.errors import UsageError

BASE_PROMPT = "a photo of {0}"

PROMPTS_HELP = "'#'-separated prompts; {0} = '<token> <class>'."  # the help of train's and inference's prompt flags

MAX_PROMPT_LENGTH = 1000

MAX_WORD_LENGTH = 64


def check_text(flag: str, text: str, limit: int) -> None:
    """A word or prompt: not empty, no control characters, at most `limit` characters."""
    if not text.strip():
        raise UsageError(f"{flag} must not be empty; pass some text")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"{flag}: {text[:40]!r} holds a control character (a newline?); remove it")
    if len(text) > limit:
        raise UsageError(f"{flag}: {text[:40]!r}... has {len(text)} characters; the limit is {limit}, shorten it")


def check_templates(flag: str, templates: list[str]) -> None:
    """Prompt templates whose only field is {0} (the concept), each of a sane length."""
    for template in templates:
        check_text(flag, template, MAX_PROMPT_LENGTH)
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
        except ValueError as err:
            raise UsageError(f"{flag}: {template!r} has unbalanced braces ({err}); write {{{{ and }}}} for braces")
        for name, spec, conv in fields:
            if name not in ("0", "") or spec or conv:
                raise UsageError(f"{flag}: {template!r} has the field {{{name}}}; only {{0}} (the concept) may stand "
                                 "in braces, write {{ and }} for braces")


def split_prompts(prompts: str | None) -> list[str]:
    """'a {0} on a bike#a {0} swimming' -> two templates (blank parts dropped)."""
    return [p.strip() for p in (prompts or "").split("#") if p.strip()]
