"""The import graph check (analysis/import_graph.py): on hand-built packages it finds each kind of upward import
and passes a clean one; on pyro_bc itself it finds none."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "analysis"))
import import_graph


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_clean_package_has_no_upward_import(tmp_path):
    root = _package(tmp_path, {"pyro_bc/__init__.py": "from pyro_bc.nn import layers\n",
                               "pyro_bc/errors.py": "",
                               "pyro_bc/nn/__init__.py": "", "pyro_bc/nn/layers.py": "from pyro_bc import errors\n",
                               "pyro_bc/runs/load.py": "from models import build\nimport pyro_bc.nn.layers\n"})
    graph = import_graph.edges(root)
    assert graph["nn"] == {"base"} and graph["runs"] == {"models", "nn"} and graph["front"] == {"nn"}
    assert import_graph.upward(graph) == []


def test_upward_imports_and_the_apps_models_are_found_even_inside_functions(tmp_path):
    root = _package(tmp_path, {
        "pyro_bc/nn/__init__.py": "",
        "pyro_bc/nn/layers.py": "def f():\n    from pyro_bc.compression.graph import x\n",  # nn below compression
        "pyro_bc/compression/__init__.py": "", "pyro_bc/compression/graph.py": "x = 1\n",
        "pyro_bc/train/loop.py": "from models import build_network\n",  # only runs and the CLI may
        "pyro_bc/bcz/codec.py": "from pyro_bc.compression import graph\n",  # a submodule named in the import list
    })
    bad = import_graph.upward(import_graph.edges(root))
    assert sorted(bad) == [("bcz", "compression"), ("nn", "compression"), ("train", "models")]
    assert import_graph.offending_modules("nn", "compression", root) == ["pyro_bc.nn.layers"]


def test_pyro_bc_imports_nothing_above_itself(capsys):
    assert import_graph.main([]) == 0, capsys.readouterr().err
