"""The core's import structure: every module imports on its own, the intra-package import graph has
no cycle (function-level imports included), and the library never imports its command-line
modules nor a plugin."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sae"
COMMAND_LINE = {"lightning_sae.cli", "lightning_sae.export_cli"}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_names(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that the import statements anywhere in `tree` name (in functions
    too), except inside `if TYPE_CHECKING:`, which never runs. `from a import b` names the module
    a.b where there is one (Python then needs a only as b's parent), else a."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:  # only the `else:` branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that holds `module`
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names & modules


def parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package its import statements run}, from the source alone.

    Importing a.b.c runs the packages a and a.b first, so those count too; except a module's own
    parent packages, which Python always initialises before the module itself (naming one
    explicitly, `import lightning_sae` inside lightning_sae.data.cache, does count)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        named = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", set(files))
        own = set(parents(module))
        implied = {parent for name in named for parent in parents(name) if parent not in own}
        graph[module] = (named | implied) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    # The check below is only worth what this finder is: it must see a cycle through a function-
    # level import, and a relative one, and must not call an ordinary diamond a cycle.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
    tree = ast.parse(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from lightning_sae.module import SAETrainingModule
        def f():
            from lightning_sae.formats import load_sae
        from . import cache
        from .hooks import hook_point
    """))
    known = {"lightning_sae.formats", "lightning_sae.module", "lightning_sae.data.cache", "lightning_sae.data.hooks",
             "lightning_sae.data"}
    names = imported_names(tree, "lightning_sae.data.datamodule", False, known)
    assert names == {"lightning_sae.formats", "lightning_sae.data.cache", "lightning_sae.data.hooks"}


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"lightning_sae.module", "lightning_sae.sae", "lightning_sae.data.cache"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_library_imports_neither_its_command_line_nor_a_plugin():
    files = module_files()
    for module, path in files.items():
        if module in COMMAND_LINE:
            continue
        named = imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py", set(files))
        assert not named & COMMAND_LINE, f"{module} imports {sorted(named & COMMAND_LINE)}"
        text = path.read_text()
        assert "import lightning_sae_" not in text and "from lightning_sae_" not in text, f"{module} imports a plugin"


# Run in a fresh interpreter: the third-party libraries are imported once (the slow part), then
# every module of the package is imported in a child forked from that state, in which no module of
# the package was ever loaded. A cycle that breaks an import, or a module that only imports after
# another one has, fails here in the child that imports it.
_IMPORT_EACH = """
import os, sys, importlib, traceback
import numpy, torch, lightning, transformers, safetensors  # noqa: F401
assert not [m for m in sys.modules if m == "lightning_sae" or m.startswith("lightning_sae.")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    import pytest

    if not hasattr(__import__("os"), "fork"):
        pytest.skip("needs os.fork")
    modules = sorted(module_files())
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    failed = done.stdout.strip().splitlines()[-1].removeprefix("FAILED:")
    assert not failed, f"these modules do not import on their own: {failed}\n{done.stderr[-4000:]}"


# docs/architecture.md's layers, top to bottom; a module may import its own layer and those below.
# SAE math and data are side by side: neither imports the other.
LAYERS: list[tuple[str, set[str]]] = [
    ("command line", {"", "cli", "export_cli", "console"}),
    ("training", {"module", "callbacks", "evaluation", "spliced"}),
    ("SAE files", {"formats", "checkpoint_io", "circuit_tracer"}),
    ("SAE math", {"sae", "selection", "sparse_ops", "metrics", "registry", "registered", "normalization"}),
    ("data", {"data", "tensor_data"}),
    ("foundation", {"atomic", "batching", "data_request", "errors", "hardware", "progress", "version"}),
]
BESIDE = {("SAE math", "data"), ("data", "SAE math")}


def layer_of(module: str) -> int:
    short = module.removeprefix("lightning_sae").lstrip(".")
    top = short.split(".")[0]
    for position, (_, members) in enumerate(LAYERS):
        if top in members:
            return position
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it there and here")


def test_imports_follow_the_documented_layers():
    for module, targets in import_graph().items():
        for target in targets:
            source_layer, target_layer = layer_of(module), layer_of(target)
            names = (LAYERS[source_layer][0], LAYERS[target_layer][0])
            assert names not in BESIDE and target_layer >= source_layer, (
                f"{module} ({names[0]}) imports {target} ({names[1]}), a layer above it or beside it"
            )
