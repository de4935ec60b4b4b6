"""One-way layers: models/data -> likelihood -> objectives -> training -> CLI.

Importing the likelihood layer or an objective loads no recipe, personalization or robot module, and the package
has no import cycle. The cycle check reads every module's top-level imports (``import`` / ``from ... import`` outside
functions) and counts an import of ``a.b.c`` as importing the packages ``a.b`` and ``a`` too, as Python does, except
the importer's own parent packages (already loading).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "diffalign"
UPPER = ("diffalign.training", "diffalign.personalization", "diffalign.robot", "diffalign.toy", "diffalign.cli")


@pytest.mark.parametrize("module", ["diffalign.likelihood", "diffalign.objectives", "diffalign.objectives.dpo",
                                    "diffalign.objectives.seppo"])
def test_lower_layers_import_nothing_above_them(module):
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({UPPER!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loads {out.strip()}"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _top_level_imports(name: str, path: Path, modules: dict) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        nodes = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))] if isinstance(
            node, (ast.If, ast.Try)) else [node]
        for n in nodes:
            if isinstance(n, ast.Import):
                found |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = here
                for _ in range(max(n.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (base + "." + n.module if n.module else base) if n.level else (n.module or "")
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in n.names}
    return {m for m in found if m in modules}


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _top_level_imports(name, path, modules)
        graph[name] = (deps | {a for d in deps for a in _ancestors(d)}) - _ancestors(name) - {name}
    cycles, state = [], {}

    def visit(node, trail):  # depth-first search; a back edge to a module on the trail closes a cycle
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
