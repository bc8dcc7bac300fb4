"""How the package imports: the command line starts without torch, and no module imports itself in a circle.

The import graph is read from the source (every ``import`` of an emalign module, at the top or inside a
function, except those under ``if TYPE_CHECKING:``), so an import that runs only on some path counts too.
A submodule's implicit import of its parent package is not an edge: that is how packages load.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "emalign"
HEAVY = ("torch", "dask", "zarr")
MATH_CORE = (
    "fields",
    "rigid",
    "affine",
    "consensus",
    "masks",
    "patches",
    "tiling",
    "downsample",
    "metrics",
    "pixelsize",
    "synth",
)
NETWORKS = ("models", "inference", "train", "train_config", "volume_train_config", "volumetric")
FRONT_ENDS = ("pipeline", "register", "evaluate", "demo", "cli", "cli_options", "cli_volume", "napari")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every module of the package at ``package_dir``."""
    files = {module_name(path, package_dir.parent): path for path in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            edges |= {target for target in targets if target in files and target != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]``, or ``[]`` when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def loaded_after(code: str) -> list[str]:
    """The heavy libraries in ``sys.modules`` after running ``code`` in a fresh interpreter at the repository root."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_importing_the_command_line_loads_neither_torch_nor_dask_nor_zarr():
    assert loaded_after("import emalign.cli") == []


def test_help_of_the_command_of_a_stage_and_of_both_trainings_loads_neither_torch_nor_dask_nor_zarr():
    code = (
        "from click.testing import CliRunner\nfrom emalign.cli import main\n"
        "for args in (['--help'], ['align', '--help'], ['train', '--help'], ['volume', '--help'],\n"
        "             ['volume', 'train', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args"
    )
    assert loaded_after(code) == []


def test_the_in_memory_api_is_still_reachable_from_the_package():
    assert loaded_after("import emalign\nassert callable(emalign.register_sections)") == list(HEAVY)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "emalign.pipeline.run" in graph and "emalign.pipeline.adapt" in graph["emalign.pipeline.run"]
    assert find_cycle(graph) == []


def imports_from(graph: dict[str, set[str]], layer: tuple[str, ...], above: tuple[str, ...]) -> dict[str, list[str]]:
    """``{module of layer: the modules of the layers above it that it imports}``, where there are any."""
    found = {}
    for module, targets in graph.items():
        if module.count(".") and module.split(".")[1] in layer:
            wrong = sorted(t for t in targets if t.count(".") and t.split(".")[1] in above)
            if wrong:
                found[module] = wrong
    return found


def test_the_math_core_imports_nothing_from_the_layers_above_it():
    assert imports_from(import_graph(), MATH_CORE, NETWORKS + FRONT_ENDS + ("io", "cluster", "device")) == {}


def test_the_networks_import_nothing_from_the_pipeline_or_the_front_ends():
    assert imports_from(import_graph(), NETWORKS, FRONT_ENDS) == {}


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import_and_skips_type_only_imports(tmp_path):
    package = tmp_path / "emalign"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from emalign import b\n")
    (package / "b.py").write_text("def f():\n    from emalign.a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from emalign.d import h\n")
    (package / "d.py").write_text("from emalign.c import k\n")
    graph = import_graph(package)
    assert graph["emalign.b"] == {"emalign.a"} and graph["emalign.c"] == set()
    assert find_cycle(graph) == ["emalign.a", "emalign.b", "emalign.a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []
