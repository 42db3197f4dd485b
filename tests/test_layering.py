"""The package's layering as checked contracts (``.importlinter`` at the repository root) and no import cycles.

import-linter reads every import statement, those inside functions included, so a lazy import cannot hide a
dependency that breaks the layers. The contracts analyse the installed ``capi_backbones`` (CI: the built wheel).
"""

from pathlib import Path

import grimp
import pytest
from importlinter.application.use_cases import SUCCESS, lint_imports
from importlinter.configuration import configure

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / ".importlinter"


def test_every_import_contract_is_kept(capsys):
    configure()
    result = lint_imports(config_filename=str(CONFIG), cache_dir=None)
    report = capsys.readouterr().out
    assert result == SUCCESS, report  # the report names each broken contract and the import chain that breaks it
    assert "4 kept, 0 broken" in report


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (a package importing its own parent is no cycle)."""
    edges = {
        module: {
            imported
            for imported in graph.find_modules_directly_imported_by(module)
            if not module.startswith(imported + ".") and imported != "capi_backbones"
        }
        for module in graph.modules
    }
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module):  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back():
    assert _cycles(grimp.build_graph("capi_backbones")) == []


def test_the_cycle_check_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for module in ("capi_backbones", "capi_backbones.a", "capi_backbones.b", "capi_backbones.c"):
        graph.add_module(module)
    graph.add_import(importer="capi_backbones.a", imported="capi_backbones.b")
    graph.add_import(importer="capi_backbones.b", imported="capi_backbones.a")
    graph.add_import(importer="capi_backbones.c", imported="capi_backbones")  # a module importing its package
    assert _cycles(graph) == [["capi_backbones.a", "capi_backbones.b"]]


@pytest.mark.parametrize("name", ["layers", "models", "viz", "foundations"])
def test_each_contract_is_declared(name):
    assert f"[importlinter:contract:{name}]" in CONFIG.read_text()


def test_every_top_level_module_is_in_a_contract():
    """A new module or package directly under capi_backbones must be placed in the layering (a layer, viz or a
    foundation), else nothing checks what it imports. ``__main__`` only starts the command line."""
    import configparser
    import pkgutil

    import capi_backbones

    config = configparser.ConfigParser()
    config.read(CONFIG)
    placed = set(config["importlinter:contract:layers"]["layers"].replace("|", " ").split())
    for name in ("viz", "foundations"):
        placed |= set(config[f"importlinter:contract:{name}"]["source_modules"].split())
    top = {f"capi_backbones.{info.name}" for info in pkgutil.iter_modules(capi_backbones.__path__)} - {
        "capi_backbones.__main__"
    }
    assert {"capi_backbones.schedules", "capi_backbones.train", "capi_backbones.timm"} <= top
    assert not top - placed, f"place these modules in a contract of {CONFIG.name}: {sorted(top - placed)}"
