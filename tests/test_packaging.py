"""The package as installed: its requirements and what `import tlora` loads."""

import ast
import tomllib

from packaging.requirements import Requirement

from conftest import REPO

ENTRY_POINTS = ("analyze", "benchmark", "cli", "demo", "evaluate", "export", "inference", "tiny")  # python -m tlora.X


def test_torch_pin_admits_no_torch_without_fused_cpu_adamw():
    """torch.optim.AdamW(fused=True) on the CPU needs torch 2.4."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch.specifier.contains("2.3.1") and torch.specifier.contains("2.4.0")


def imported_at_import(module: str) -> set[str]:
    """The tlora modules that importing `module` imports (top-level imports, followed)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = REPO / (name.replace(".", "/") + ".py")
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
                folder = REPO / base.replace(".", "/")
                todo += [base] + [f"{base}.{a.name}" for a in node.names if (folder / f"{a.name}.py").is_file()]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("tlora.")]
    return seen


def test_import_tlora_loads_no_entry_point():
    """Else `python -m tlora.X` finds tlora.X already imported and runpy warns on every run."""
    loaded = imported_at_import("tlora")
    assert "tlora.reading" in loaded and "tlora.settings" in loaded
    assert not [m for m in loaded if m.removeprefix("tlora.") in ENTRY_POINTS]
    assert "tlora.export" in imported_at_import("tlora.export") - loaded  # the check itself sees entry points
