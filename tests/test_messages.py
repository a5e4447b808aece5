"""Each message text is written once: a clause of five words or more in two string literals of tlora (docstrings
aside) is a text to share (common/messages.py, or a function that builds the message)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict

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
