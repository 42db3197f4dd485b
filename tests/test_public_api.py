"""The public API is a list checked in (tests/public_api.txt), so that a public name cannot disappear, or appear at
the package's top level, without someone meaning it. After a deliberate change, rewrite the list with
``python tests/test_public_api.py --write`` and update docs/api.md."""

import pkgutil
import re
import sys
from collections import defaultdict
from importlib import import_module
from pathlib import Path

LIST = Path(__file__).with_name("public_api.txt")
API_PAGE = Path(__file__).parents[1] / "docs" / "api.md"
HEADER = (
    "# The public API: 'module name', one a line; compared with the package by tests/test_public_api.py "
    "(see docs/api.md).\n"
    "# The capi_backbones lines are exactly capi_backbones.__all__; every other name must stay importable from its "
    "module.\n"
)


def listed() -> dict[str, set[str]]:
    names = defaultdict(set)
    for line in LIST.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            module, name = line.split()
            names[module].add(name)
    return names


def test_the_package_exports_exactly_the_listed_names():
    import capi_backbones

    expected = listed()["capi_backbones"]
    exported = set(capi_backbones.__all__)
    assert not expected - exported, f"public names gone from capi_backbones.__all__: {sorted(expected - exported)}"
    added = sorted(exported - expected)
    assert not added, f"new names in capi_backbones.__all__, not in {LIST.name}: {added}"
    assert len(capi_backbones.__all__) == len(exported), "capi_backbones.__all__ lists a name twice"
    missing = [name for name in exported if not hasattr(capi_backbones, name)]
    assert not missing, f"capi_backbones.__all__ names that do not exist: {missing}"


def test_public_names_of_the_public_modules_stay():
    gone = []
    for module_name, names in listed().items():
        module = import_module(module_name)
        gone += [f"{module_name}.{n}" for n in sorted(names) if not hasattr(module, n)]
    assert not gone, f"public names that disappeared: {gone}"


def test_the_api_page_names_every_public_name():
    page = API_PAGE.read_text(encoding="utf-8")
    missing = [f"{m}.{n}" for m, names in listed().items() for n in sorted(names) if f"`{n}`" not in page]
    assert not missing, f"docs/api.md does not name: {missing}"
    modules_named = [m for m in listed() if f"`{m}`" not in page]
    assert not modules_named, f"docs/api.md does not name the modules {modules_named}"


def _api_page_modules() -> tuple[set[str], set[str]]:
    """(public, internal) modules named by docs/api.md: the first column of its table of public modules, and the
    section "Internal modules", where ``in `PACKAGE`: `a`, `b` `` names ``PACKAGE.a`` and ``PACKAGE.b`` until the
    bullet ends."""
    page = API_PAGE.read_text(encoding="utf-8")
    public = {"capi_backbones", *re.findall(r"^\| `(capi_backbones[\w.]*)` \|", page, flags=re.MULTILINE)}
    section = page.split("## Internal modules", 1)[1].split("\n## ", 1)[0]
    internal, unplaced = set(), []
    for bullet in re.split(r"\n- ", section)[1:]:
        package = None
        for prefix, name in re.findall(r"(\bin\s+)?`([^`]+)`", bullet):
            if prefix:
                package = name
            elif name.startswith("capi_backbones"):
                internal.add(name)
            elif re.fullmatch(r"\w+", name):
                unplaced += [name] if package is None else []
                internal.add(f"{package}.{name}")
    assert not unplaced, f"docs/api.md names {unplaced} under Internal modules without 'in `PACKAGE`:' before them"
    return public, internal


def _package_modules() -> set[str]:
    """Every module of the installed package (found through importlib: CI tests the installed wheel)."""
    import capi_backbones

    return {"capi_backbones"} | {
        info.name for info in pkgutil.walk_packages(capi_backbones.__path__, "capi_backbones.")
    }


def test_the_api_page_places_every_module_as_public_or_internal():
    public, internal = _api_page_modules()
    assert {"capi_backbones.models", "capi_backbones.train"} <= public, "the table of public modules was not read"
    assert {"capi_backbones.cli.main", "capi_backbones.runtime.seeding"} <= internal, "the internal list was not read"
    modules = _package_modules()
    assert not public & internal, f"docs/api.md calls these both public and internal: {sorted(public & internal)}"
    unplaced = sorted(modules - public - internal)
    assert not unplaced, f"new modules: name each in docs/api.md, as public or under Internal modules: {unplaced}"
    stale = sorted((public | internal) - modules)
    assert not stale, f"docs/api.md names modules the package does not have: {stale}"


def write_list() -> None:
    """Rewrite the list from the package: capi_backbones.__all__, and the other modules' names kept while they still
    exist (names are added to those modules' lines by hand)."""
    import capi_backbones

    names = listed()
    names["capi_backbones"] = set(capi_backbones.__all__)
    lines = [
        f"{m} {n}"
        for m, ns in names.items()
        for n in sorted(ns, key=str.lower)
        if m == "capi_backbones" or hasattr(import_module(m), n)
    ]
    LIST.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write_list()
