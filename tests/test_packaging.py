"""The package as installed: its requirements, its layers, and what `import tlora` loads."""

import ast

import pytest
import tomllib
from packaging.requirements import Requirement

from helpers import REPO

# The stages, lowest first: a module imports only from its own stage or the ones before it (anywhere in the file,
# lazy imports included); the top-level modules (the package API and the commands) may import any stage.
STAGES = ("common", "method", "families", "formats", "runs", "interop", "generate", "train", "evaluation")
KNOWN_UPWARD: set[str] = set()  # imports that point up: none (the method knows no model)
ENTRY_POINTS = ("analyze", "benchmark", "cli", "demo", "estimate", "evaluate", "export", "protocol", "tiny")  # python -m tlora.X


def test_torch_pin_admits_no_torch_without_fused_cpu_adamw():
    """torch.optim.AdamW(fused=True) on the CPU needs torch 2.4."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch.specifier.contains("2.3.1") and torch.specifier.contains("2.4.0")


def module_path(module: str):
    path = REPO / (module.replace(".", "/") + ".py")
    return path if path.is_file() else REPO / module.replace(".", "/") / "__init__.py"


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The tlora modules a module imports (`from tlora import x` counts as tlora.x)."""
    tree = ast.parse(module_path(module).read_text())
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlora":
            found |= {f"tlora.{a.name}" for a in node.names} if node.module == "tlora" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tlora"}
    return found


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else len(STAGES)


def test_imports_only_point_down():
    modules = [str(p.relative_to(REPO))[:-3].replace("/", ".").removesuffix(".__init__")
               for p in (REPO / "tlora").rglob("*.py")]
    upward = {f"{m} -> {t}" for m in modules for t in imports(m) if stage(t) > stage(m)}
    assert len(modules) > 40 and upward == KNOWN_UPWARD  # the method knows no model


def test_import_tlora_loads_no_entry_point():
    """Else `python -m tlora.X` finds tlora.X already imported and runpy warns on every run."""
    loaded, todo = set(), ["tlora"]
    while todo:
        module = todo.pop()
        if module not in loaded and module_path(module).is_file():
            loaded.add(module)
            todo += imports(module, top_level_only=True)  # imports inside functions are lazy
    assert {"tlora.runs.reading", "tlora.method.settings"} <= loaded
    assert not loaded & {f"tlora.{name}" for name in ENTRY_POINTS}
    assert "tlora.interop.exporting" in imports("tlora.export")  # the shim names its command's module


def test_console_script_names_each_command_and_its_module(capsys, monkeypatch):
    import importlib

    from tlora import cli

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tlora": "tlora.cli:main"}
    assert all(callable(c) or callable(importlib.import_module(c).main) for c in cli.COMMANDS.values())
    assert cli.main(["--help"]) == 0 and "export" in capsys.readouterr().out
    assert cli.main(["retrain"]) == 2 and "usage: tlora {train," in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["/venv/bin/tlora", "export", "--help"])
    with pytest.raises(SystemExit, match="0"):
        cli.main()
    assert capsys.readouterr().out.startswith("usage: tlora export ")  # argparse names the subcommand


def test_no_two_modules_share_a_name():
    """A command's shim (tlora/export.py) and the module that holds it must not both be called `export`."""
    names = [p.stem for p in (REPO / "tlora").rglob("*.py") if p.stem != "__init__"]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []


def test_the_protocol_command_and_its_old_name(capsys):
    from tlora import cli
    from tlora.benchmark import main as old_name
    from tlora.protocol import main

    assert cli.COMMANDS["protocol"] == cli.COMMANDS["benchmark"] == "tlora.evaluation.paper_protocol"
    assert old_name is main
    with pytest.raises(SystemExit, match="0"):
        main(["--help"])
    assert "manifest" in capsys.readouterr().out
