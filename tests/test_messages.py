"""Each message text is written once: a clause of five words or more in two string literals of tlora (docstrings
aside) is a text to share (common/messages.py, or a function that builds the message)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO

MIN_WORDS = 5


def clauses() -> dict[str, list[str]]:
    """Clause of a string literal -> where it is written (file:line)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted((REPO / "tlora").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for clause in re.split(r"[;:()]", node.value):
                    clause = clause.strip(" ,.")
                    if len(clause.split()) >= MIN_WORDS:
                        found[clause].append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_message_text_is_written_twice():
    twice = {clause: where for clause, where in clauses().items() if len(where) > 1}
    assert twice == {}


def test_the_check_sees_a_text_written_twice(tmp_path, monkeypatch):
    (tmp_path / "tlora").mkdir()
    (tmp_path / "tlora" / "a.py").write_text('X = f"{p} is damaged; copy it again or use another one"\n')
    (tmp_path / "tlora" / "b.py").write_text('"""Copy it again or use another one, says a docstring."""\n'
                                            'Y = "copy it again or use another one"\n')
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    assert clauses()["copy it again or use another one"] == ["tlora/a.py:1", "tlora/b.py:2"]


# -- every error tlora makes says the fix ------------------------------------------------------------------------
# A message is rebuilt from its literal: an f-string's value by its text when that is known (a str constant of the
# module or imported from another module of tlora, a local name, a call of a tlora function that returns literals),
# else as X; a value with two texts (`a if c else b`) gives two messages. A `fix` parameter stands for the fix its
# callers pass (each checked as a fix), and `err` of `except UsageError as err` for a message checked where it is
# made. A message that is no literal at all (`UsageError(message)`) is counted, and the count kept small.
ROOTS = {"UsageError", "CheckpointError", "RunFailed"}
FIX_PARAMETER = re.compile(r"(\w+_)?fix")  # fix, cuda_fix: a function's parameter for the fix its message ends in
FROM_CALLER = "<the fix its caller passes>"
CHECKED = "<the message of an error checked where it is made>"
MAX_VARIANTS = 64
NOT_LITERAL = 1  # flags.py: parse errors with argparse's own words, redacted
KNOWN: set[tuple[str, str]] = set()  # (file, text) of errors still without a fix: none; it only shrinks


class Messages:
    """The texts of tlora's message literals, resolved as far as the source tells."""

    def __init__(self, root: Path) -> None:
        self.trees = {str(path.relative_to(root)): ast.parse(path.read_text())
                      for path in sorted((root / "tlora").rglob("*.py"))}
        self.functions: dict[str, list[tuple[str, ast.FunctionDef]]] = defaultdict(list)
        self.scopes: dict[int, list[ast.FunctionDef]] = {}  # id(node) -> the functions it is in, innermost last
        for module, tree in self.trees.items():
            self._scope(module, tree, [])
        self.errors = self._error_classes()

    def _scope(self, module: str, node: ast.AST, chain: list) -> None:
        for child in ast.iter_child_nodes(node):
            self.scopes[id(child)] = chain
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[child.name].append((module, child))
                self._scope(module, child, [*chain, child])
            else:
                self._scope(module, child, chain)

    def _error_classes(self) -> set[str]:
        """ROOTS and every class of tlora that derives from one of them, at any depth."""
        bases = {node.name: {getattr(base, "id", getattr(base, "attr", "")) for base in node.bases}
                 for tree in self.trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        found = set(ROOTS)
        while grown := {name for name, of in bases.items() if of & found} - found:
            found |= grown
        return found

    def made(self) -> Iterator[tuple[str, str, ast.Call]]:
        """(module, file:line, call) of every error of those classes that tlora makes."""
        for module, tree in self.trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and node.args and _called(node) in self.errors:
                    yield module, f"{module}:{node.lineno}", node

    def fixes_passed(self) -> Iterator[tuple[str, str, ast.expr]]:
        """(module, file:line, value) of every value tlora passes for a fix parameter of a function, and of every
        such parameter's default."""
        for name, defs in self.functions.items():
            for module, func in defs:
                fixes = [arg.arg for arg in func.args.args + func.args.kwonlyargs if FIX_PARAMETER.fullmatch(arg.arg)]
                if not fixes:
                    continue
                defaults = _defaults(func)
                yield from ((module, f"{module}:{func.lineno}", defaults[fix]) for fix in fixes if fix in defaults)
                for caller, tree in self.trees.items():
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Call) and _called(node) == name:
                            given = _bind(node, func)
                            yield from ((caller, f"{caller}:{node.lineno}", given[fix]) for fix in fixes if fix in given)

    # -- what a piece of a message says --------------------------------------------------------------------------
    def texts(self, node: ast.expr, module: str, bound: dict | None = None, seen: frozenset = frozenset()
              ) -> list[str] | None:
        """Every text `node` can stand for; None when it is no literal. `bound`: a called function's parameters."""
        if id(node) in seen:
            return None
        seen |= {id(node)}
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else None
        if isinstance(node, ast.JoinedStr):
            return _joined([[part.value] if isinstance(part, ast.Constant)
                            else self.texts(part.value, module, bound, seen) or ["X"] for part in node.values])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return _joined([self.texts(node.left, module, bound, seen), self.texts(node.right, module, bound, seen)])
        if isinstance(node, ast.IfExp):  # both texts; a None (no text: no message) neither
            body, orelse = ([] if _is_none(branch) else self.texts(branch, module, bound, seen)
                            for branch in (node.body, node.orelse))
            return None if body is None or orelse is None else body + orelse
        if isinstance(node, ast.Name):
            return self._name(node, module, bound or {}, seen)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):  # a constant of an imported module
            source = self._module_of(node.value.id, module)
            return self._global(node.attr, source, seen) if source else None
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "format":
                return self.texts(node.func.value, module, bound, seen)
            return self._returned(node, module, bound, seen)
        return None

    def _name(self, node: ast.Name, module: str, bound: dict, seen: frozenset) -> list[str] | None:
        for func in reversed(self.scopes[id(node)]):
            values = [n.value for n in ast.walk(func) if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == node.id for t in n.targets)]
            if values:
                found = [self.texts(value, module, bound, seen) for value in values]
                return None if None in found else [text for texts in found for text in texts]
            if node.id in [arg.arg for arg in func.args.args + func.args.kwonlyargs]:
                if node.id in bound:
                    return bound[node.id]
                return [FROM_CALLER] if FIX_PARAMETER.fullmatch(node.id) else None
            caught = [n.type for n in ast.walk(func) if isinstance(n, ast.ExceptHandler) and n.name == node.id]
            if caught:  # `except UsageError as err`: its message is one of those checked here
                kinds = [getattr(k, "id", "") for c in caught for k in getattr(c, "elts", [c])]
                return [CHECKED] if set(kinds) <= self.errors else None
        return self._global(node.id, module, seen)

    def _module_of(self, name: str, module: str) -> str | None:
        """The file of the tlora module that `module` imports as `name` (`from tlora.runs import lycoris`)."""
        for node in self.trees[module].body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlora"):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return _file(f"{node.module}.{alias.name}", self.trees)
        return None

    def _global(self, name: str, module: str, seen: frozenset) -> list[str] | None:
        """A module-level name: a constant of `module`, or one it imports from another module of tlora."""
        for node in self.trees[module].body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return self.texts(node.value, module, None, seen)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlora."):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _file(node.module, self.trees)
                        return self._global(alias.name, source, seen) if source else None
        return None

    def _returned(self, call: ast.Call, module: str, bound: dict | None, seen: frozenset) -> list[str] | None:
        """What a call of a tlora function returns, when each of its returns is a literal."""
        defs = self.functions.get(_called(call))
        if not defs:
            return None
        found = []
        for where, func in defs:
            given = _defaults(func) | _bind(call, func)
            args = {name: self.texts(value, module, bound, seen) for name, value in given.items()}
            returns = [n.value for n in ast.walk(func) if isinstance(n, ast.Return) and n.value is not None
                       and self.scopes[id(n)][-1] is func]
            texts = [self.texts(value, where, args, seen) for value in returns]
            if not returns or None in texts:
                return None
            found += [text for each in texts for text in each]
        return found[:MAX_VARIANTS]


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _called(call: ast.Call) -> str:
    return getattr(call.func, "id", getattr(call.func, "attr", ""))


def _file(dotted: str, trees: dict) -> str | None:
    path = dotted.replace(".", "/")
    return next((m for m in (f"{path}.py", f"{path}/__init__.py") if m in trees), None)


def _defaults(func: ast.FunctionDef) -> dict[str, ast.expr]:
    """`func`'s parameters that have a default, with it."""
    params, defaults = [arg.arg for arg in func.args.args], func.args.defaults
    keyword_only = {arg.arg: value for arg, value in zip(func.args.kwonlyargs, func.args.kw_defaults) if value}
    return dict(zip(params[len(params) - len(defaults):], defaults)) | keyword_only


def _bind(call: ast.Call, func: ast.FunctionDef) -> dict[str, ast.expr]:
    """The call's arguments by the names of `func`'s parameters (a method called on an object skips `self`)."""
    params = [arg.arg for arg in func.args.args]
    if params[:1] == ["self"] and isinstance(call.func, ast.Attribute):
        params = params[1:]
    return dict(zip(params, call.args)) | {kw.arg: kw.value for kw in call.keywords if kw.arg}


def _joined(parts: list[list[str] | None]) -> list[str] | None:
    if None in parts:
        return None
    texts = [""]
    for part in parts:
        texts = [text + each for text in texts for each in part][:MAX_VARIANTS]
    return texts


def says_no_fix(root: Path) -> tuple[dict[str, str], list[str]]:
    """({file:line: a text of an error with no fix}, [file:line of the errors whose message is no literal])."""
    from conftest import fix_clause

    source, missing, other = Messages(root), {}, []
    for module, where, call in source.made():
        texts = source.texts(call.args[0], module)
        if texts is None:
            other.append(where)
        for text in texts or []:
            if FROM_CALLER not in text and CHECKED not in text and not fix_clause(text):
                missing.setdefault(where, text)
    for module, where, value in source.fixes_passed():
        if _is_none(value):
            continue
        for text in source.texts(value, module) or ["X"]:
            if text != FROM_CALLER and not fix_clause(text):
                missing.setdefault(where, f"fix={text!r}")
    return missing, other


def test_every_error_says_the_fix():
    missing, other = says_no_fix(REPO)
    said = {(where.rpartition(":")[0], text) for where, text in missing.items()}
    assert said - KNOWN == set()
    assert KNOWN - said == set(), "fixed: take these off KNOWN"
    assert len(other) <= NOT_LITERAL, other


def test_the_fix_check_sees_an_error_without_one(tmp_path):
    (tmp_path / "tlora").mkdir()
    (tmp_path / "tlora" / "texts.py").write_text('FIX = "pass another file"\n')
    (tmp_path / "tlora" / "a.py").write_text(
        "from tlora.texts import FIX\n"
        "DAMAGED = 'the file is damaged'\n"
        "class Refused(UsageError): ...\n"
        "def damaged(path):\n"
        "    raise Refused(f'{path}: {DAMAGED}')\n"  # a constant, and no fix
        "def bad(path, fix):\n"
        "    raise UsageError(f'{path} is bad; {fix}')\n"
        "def reads(path):\n"
        "    if path:\n"
        "        raise UsageError(f'{path} is bad; {FIX}')\n"  # an imported fix
        "    bad(path, 'check it')\n"  # a fix passed in, that is none
        "    bad(path, fix=FIX)\n"
        "    fix = 'use the file' if path else 'it is gone'\n"
        "    raise UsageError(f'{path}; {fix}')\n"  # one of two texts has no fix
        "def refuse(message):\n"
        "    raise UsageError(message)\n")
    assert says_no_fix(tmp_path) == ({"tlora/a.py:5": "X: the file is damaged", "tlora/a.py:11": "fix='check it'",
                                      "tlora/a.py:14": "X; it is gone"}, ["tlora/a.py:16"])
