"""The import graph of pyro_bc's subpackages, read from the code: what each one imports, and any import that runs
against the data path (a subpackage importing one above it).

    python analysis/import_graph.py          # prints each floor's imports; exit 1 if an import runs upward

Floors, from the bottom: the shared base (errors, atomic writes, defaults, the allocator), data, infer, priors, nn,
metrics, train, bcz, compression, report, and on top the run-directory layer, the CLI and the package's front door
(``pyro_bc/__init__.py``). Every import counts, those inside functions too: an import deferred to a call still runs.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The data path, bottom first. A floor may import itself and the floors below it.
FLOORS: tuple[str, ...] = ("base", "data", "infer", "priors", "nn", "metrics", "train", "bcz", "compression",
                           "report", "runs", "cli", "front")
BASE_MODULES = {"errors", "atomic", "defaults", "allocator"}
TOP_MODULES = {"runs": "runs", "cli": "cli", "__init__": "front"}
APP = "models"  # the networks of the command line: only the run-directory layer and the CLI may import them


def floor_of(module: str) -> str:
    """The floor of a dotted module name inside pyro_bc (``pyro_bc.nn.kinds`` -> ``nn``), or ``models``."""
    parts = module.split(".")
    if parts[0] == APP:
        return APP
    head = parts[1] if len(parts) > 1 else "__init__"
    if head in BASE_MODULES:
        return "base"
    return TOP_MODULES.get(head, head)


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """The pyro_bc and models modules that ``path`` imports (``from pyro_bc.x import y``: ``pyro_bc.x.y`` when
    ``y`` is a module, else ``pyro_bc.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (root / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else node.module)
    return {name for name in found if name.split(".")[0] in ("pyro_bc", APP)}


def edges(root: Path = ROOT) -> dict[str, set[str]]:
    """Floor -> the floors its modules import (itself left out), for the package ``root/pyro_bc``."""
    graph: dict[str, set[str]] = {floor: set() for floor in FLOORS}
    for path in sorted((root / "pyro_bc").rglob("*.py")):
        source = floor_of(module_name(path, root))
        graph[source].update(floor_of(name) for name in imports_of(path, root))
    for floor, targets in graph.items():
        targets.discard(floor)
    return graph


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports against the data path, and imports of the app's ``models`` outside the run-directory layer and CLI."""
    rank = {floor: i for i, floor in enumerate(FLOORS)}
    bad = []
    for source, targets in graph.items():
        for target in sorted(targets):
            if target == APP:
                if source not in ("runs", "cli"):
                    bad.append((source, target))
            elif rank[target] > rank[source]:
                bad.append((source, target))
    return bad


def offending_modules(source: str, target: str, root: Path = ROOT) -> list[str]:
    """The modules of floor ``source`` that import floor ``target``, for the message."""
    return [module_name(path, root) for path in sorted((root / "pyro_bc").rglob("*.py"))
            if floor_of(module_name(path, root)) == source
            and any(floor_of(name) == target for name in imports_of(path, root))]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    graph = edges()
    for floor in FLOORS:
        print(f"{floor:12s} imports {', '.join(sorted(graph[floor], key=lambda f: (f not in FLOORS, f))) or '-'}")
    bad = upward(graph)
    for source, target in bad:
        print(f"upward: {source} imports {target} ({', '.join(offending_modules(source, target))})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
