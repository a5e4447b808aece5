"""The command-line parser every command uses: `Parser` refuses a flag given twice with two values and argv
that is not UTF-8, records which flags were given, and reports bad input as one `UsageError` line (exit code 2,
before any model loads).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tlora.common.errors import UsageError
from tlora.common.redaction import redact, secret_values
from tlora.common.values import shown


def check_utf8(flag: str, text: str) -> None:
    """Text from the command line that encodes as UTF-8 (Python keeps invalid bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag}: the text is not valid UTF-8; give it as UTF-8 text") from None


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
