"""The package's layering: a module imports only from its own layer or the layers below it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megadual"
# Bottom to top (STYLE.md); entry-point modules (verify, plan) sit above everything.
LAYERS = [("config", "config_validate", "arguments", "data"), ("parallel",), ("fp8",), ("moe",), ("model",), ("pipeline",), ("training",)]


def layer_of(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else module
    for level, names in enumerate(LAYERS):
        if part in names:
            return level
    return len(LAYERS)


def megadual_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    return [name for name in names if name.startswith("megadual.")]


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = "megadual." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        upward += [f"{module} imports {name}" for name in megadual_imports(path)
                   if layer_of(name) > layer_of(module)]
    assert not upward, "\n".join(upward)
