"""The dependency direction the README promises: engine <- env <- policies <- train.py.

Each package's modules may import only from the packages below it, so the live engine stays
usable without the environment, the environment without the controllers, and nothing but the
scripts depends on the main job.  Imports are read from the source (``ast``), including those
inside functions, so a lazy import cannot hide a reversed dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["engine", "env", "policies", "train"]  # each may import only from those before it


def _layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every absolute import in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _sources(layer: str) -> list[Path]:
    return [ROOT / "train.py"] if layer == "train" else sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_from_the_layers_below_it(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    sources = _sources(layer)
    assert sources, f"no sources found for {layer}"
    reversed_imports = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in _imports(path)
        if (target := _layer_of(module)) is not None and target not in allowed
    ]
    assert not reversed_imports, "\n".join(reversed_imports)


def test_the_check_sees_a_reversed_import(tmp_path):
    """The reader finds imports inside functions too, so the check above can fail."""
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from policies.server import app\n    import train\n")
    assert [_layer_of(m) for _, m in _imports(source)] == ["policies", "train"]
