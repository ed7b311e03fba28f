"""The package's layering (written once, in ``steerkit/__init__.py``'s docstring): every import, those inside
functions included, points to the importer's own layer or one below, and no import cycle exists."""

import ast
import re
from pathlib import Path

import steerkit

PACKAGE = Path(steerkit.__file__).parent


def layers() -> dict[str, int]:
    """``{module prefix: layer}`` from the docstring's table."""
    table = {}
    for line in steerkit.__doc__.splitlines():
        match = re.match(r"^\s+(\d)\s+[a-z ]+?\s{2,}(.+)$", line)
        if match:
            for name in match.group(2).split():
                table["steerkit" if name == "steerkit" else f"steerkit.{name}"] = int(match.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> int:
    """The layer of the longest prefix of ``module`` named in the table."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer of steerkit/__init__.py's table")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The steerkit modules ``module`` imports, anywhere in it. ``from steerkit.a.b import x`` also runs
    ``steerkit.a``'s ``__init__``, so it counts as importing ``steerkit.a`` (not the root, which always runs);
    a name taken from the root package itself counts as importing the root."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "steerkit" or not name.startswith("steerkit."):
                targets.add(name)
                continue
            parts = name.split(".")
            targets.update(".".join(parts[:n]) for n in range(2, len(parts) + 1))
    own = {".".join(module.split(".")[:n]) for n in range(2, module.count(".") + 2)}
    return {t for t in targets if t in known and t not in own and (t != "steerkit" or module != "steerkit")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, set(known)) for module, path in known.items()}


def test_the_layer_table_covers_every_module():
    table = layers()
    assert len(set(table.values())) >= 8
    for module in modules():
        layer_of(module, table)


def test_no_import_points_up_the_layers():
    table = layers()
    against = [f"{m} ({layer_of(m, table)}) -> {t} ({layer_of(t, table)})" for m, targets in graph().items()
               for t in targets if layer_of(t, table) > layer_of(m, table)]  # fmt: skip
    assert not against, against


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_checker_sees_an_arrow_against_the_layers(tmp_path):
    """The measuring stick: an upward import inside a function is found."""
    source = tmp_path / "vector.py"
    source.write_text("def f():\n    from steerkit.hub import push_to_hub\n    from steerkit import arch\n")
    found = imports("steerkit.vector", source, set(modules()))
    assert found == {"steerkit.hub", "steerkit.arch"}
    table = layers()
    assert layer_of("steerkit.hub", table) > layer_of("steerkit.vector", table)


LONGEST = 60  # lines of a function, its docstring included


def long_functions() -> set[str]:
    """``"steerkit/path.py: name"`` for every function (methods and nested ones too) over ``LONGEST`` lines."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= LONGEST:
                found.add(f"{path.relative_to(PACKAGE.parent)}: {node.name}")
    return found


def test_functions_stay_short_but_for_the_few_contributing_md_justifies():
    text = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    section = text.split("## Functions stay short", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- `(steerkit/[\w/]+\.py: \w+)`", section, re.MULTILINE))
    assert f"No function in `steerkit/` is over {LONGEST} lines" in section
    assert long_functions() == listed, {"long, not listed": long_functions() - listed,
                                        "listed, not long": listed - long_functions()}  # fmt: skip
