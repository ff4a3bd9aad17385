"""Layout rules for the posttrain package: a-b with the standard library (ast, pathlib), c
with ruff.

For every .py file under posttrain/ (subpackages included, found by walking the tree):
  a. no import cycle among the package's modules, counting module-level imports only;
  b. no import of a package module inside a function body, except in posttrain/cli.py;
  c. ruff over posttrain/, bench/ and tests/ (pyproject.toml's rules: unused imports and
     names, lines over 100 characters, functions over complexity 14).
(Line and function-length caps are retired: they split algorithms into shims; an algorithm
on one screen is the aim, judged in review, not by a count.)

Each check is a plain function taking the package folder (and the package name, which defaults
to the folder's name), so the tests below first prove on a fake package that each check can
fail, then run it on the real package. A failure lists every offender with file:line and the
measured value, so one run shows everything that must be fixed.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "posttrain"
LAZY_IMPORTS_ALLOWED = frozenset({"posttrain/cli.py"})   # lazy imports keep --help fast

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


# ---------------------------------------------------------------- discovery

def modules(root: Path, package: str | None = None) -> dict[str, Path]:
    """Every module of the package in `root`, by dotted name: pkg/a/b.py is pkg.a.b and
    pkg/a/__init__.py is pkg.a. Found by walking the folder, never from a fixed list."""
    package = package or root.name
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root.parent).as_posix()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


# ---------------------------------------------------------------- a. import cycles

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]):
    """Imports that run when the module is imported: top level, inside top-level if/try/with
    blocks and class bodies; not inside functions, nor under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level_imports(block)
            for handler in node.handlers:
                yield from _module_level_imports(handler.body)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level_imports(node.body)


def _resolve(node: ast.Import | ast.ImportFrom, name: str, is_package: bool,
             known: dict[str, Path], package: str) -> list[str]:
    """The package modules an import statement in module `name` loads."""
    def longest_known(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    if isinstance(node, ast.Import):
        targets = [longest_known(a.name) for a in node.names
                   if a.name == package or a.name.startswith(package + ".")]
        return [t for t in targets if t]
    if node.level:
        base = name if is_package else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = ".".join(p for p in (base, node.module) if p)
    elif node.module == package or (node.module or "").startswith(package + "."):
        base = node.module
    else:
        return []
    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else longest_known(base)
               for a in node.names]
    return [t for t in targets if t]


def import_graph(root: Path, package: str | None = None) -> dict[str, dict[str, str]]:
    """module -> {imported module: "file:line" of the import}, module-level imports only.
    Importing pkg.a.b also runs pkg/a/__init__.py, so it is an edge to pkg.a too, except from
    modules inside pkg.a; the top package's __init__ is never a target."""
    package = package or root.name
    known = modules(root, package)
    graph: dict[str, dict[str, str]] = {name: {} for name in known}
    for name, path in known.items():
        for node in _module_level_imports(_parse(path).body):
            for target in _resolve(node, name, _is_package(path), known, package):
                parents = []
                parent = target.rpartition(".")[0]
                while parent != package and parent:
                    if name != parent and not name.startswith(parent + "."):
                        parents.append(parent)
                    parent = parent.rpartition(".")[0]
                for dst in (target, *parents):
                    if dst != package and dst != name and dst in known:
                        graph[name].setdefault(dst, f"{_rel(path, root)}:{node.lineno}")
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _shortest_cycle(graph: dict[str, dict[str, str]], start: str, within: set[str]) -> list[str]:
    came_from = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if child in within and child not in came_from:
                came_from[child] = node
                queue.append(child)
    return []


def check_cycles(root: Path, package: str | None = None) -> list[list[str]]:
    """Import cycles among the package's modules, each a list of module names (the last imports
    the first). Every module caught in a cycle appears in at least one: for each tangle (strongly
    connected component), the shortest cycle through each of its modules, without repeats."""
    graph = import_graph(root, package)
    cycles: list[list[str]] = []
    for component in _components(graph):
        for module in component:
            cycle = _shortest_cycle(graph, module, set(component))
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]
            if cycle not in cycles:
                cycles.append(cycle)
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    steps = [cycle[0]] + [f"{dst} ({graph[src][dst]})"
                          for src, dst in zip(cycle, cycle[1:] + cycle[:1])]
    return " -> ".join(steps)


# ---------------------------------------------------------------- b. imports inside functions

def _imports_in_functions(node: ast.AST, func: str | None = None):
    """(innermost enclosing function, import statement) for every import inside a def."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)) and func:
            yield func, child
        yield from _imports_in_functions(
            child, child.name if isinstance(child, _FUNCTIONS) else func)


def inner_imports(root: Path, allowed: frozenset[str] | set[str] = frozenset(),
                  package: str | None = None) -> list[str]:
    """Imports of the package's own modules inside a function body (any depth), as
    "file:line: statement (in function)"; files in `allowed` (paths like pkg/cli.py) skipped."""
    package = package or root.name
    found = []
    for path in modules(root, package).values():
        rel = _rel(path, root)
        if rel in allowed:
            continue
        for func, node in _imports_in_functions(_parse(path)):
            if isinstance(node, ast.Import):
                own = any(a.name == package or a.name.startswith(package + ".")
                          for a in node.names)
            else:
                own = node.level > 0 or node.module == package or (
                    (node.module or "").startswith(package + "."))
            if own:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} (in {func})")
    return sorted(found, key=_by_place)


def _by_place(entry: str):
    file, line, _ = entry.split(":", 2)
    return file, int(line)


# ---------------------------------------------------------------- c. ruff

ROOT = PACKAGE.parent
LINTED = ("posttrain", "bench", "tests")   # pyproject.toml's [tool.ruff]: F, E501, C901


def ruff(paths, cwd: Path) -> subprocess.CompletedProcess:
    """`ruff check` (the project's rules: unused imports and names, lines over 100
    characters, functions over complexity 14) on `paths` under `cwd`."""
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", *paths], cwd=cwd,
                          capture_output=True, text=True)


# ---------------------------------------------------------------- the checks can fail

def _package(tmp_path: Path, files: dict[str, str], name: str = "pkg") -> Path:
    root = tmp_path / name
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root


def test_modules_are_found_in_subpackages_too(tmp_path):
    root = _package(tmp_path, {"a.py": "", "sub/b.py": "", "sub/deep/c.py": ""})
    assert sorted(modules(root)) == ["pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.deep",
                                     "pkg.sub.deep.c"]


def test_a_top_level_import_cycle_is_found(tmp_path):
    root = _package(tmp_path, {"a.py": "import pkg.b\n", "b.py": "from pkg import a\n",
                               "c.py": "from pkg.a import thing\n"})
    assert check_cycles(root) == [["pkg.a", "pkg.b"]]
    assert describe_cycle(["pkg.a", "pkg.b"], import_graph(root)) == \
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:1)"


def test_every_module_in_a_tangle_is_named(tmp_path):
    root = _package(tmp_path, {"a.py": "from . import b, c\n", "b.py": "from . import a\n",
                               "c.py": "from . import a\n"})
    assert check_cycles(root) == [["pkg.a", "pkg.b"], ["pkg.a", "pkg.c"]]


def test_imports_in_top_level_if_try_with_and_class_bodies_count(tmp_path):
    root = _package(tmp_path, {
        "a.py": "import sys\nif sys:\n    from pkg import b\n",
        "b.py": "try:\n    pass\nexcept ImportError:\n    pass\nelse:\n    from . import c\n",
        "c.py": "class C:\n    from .a import x\n"})
    assert check_cycles(root) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_imports_in_functions_or_under_type_checking_make_no_edge(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from pkg import b, c, d\n",
        "b.py": "def f():\n    def g():\n        from pkg import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "d.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.a\nelse:\n    pass\n"})
    assert check_cycles(root) == []
    assert import_graph(root)["pkg.a"] == {"pkg.b": "pkg/a.py:1", "pkg.c": "pkg/a.py:1",
                                           "pkg.d": "pkg/a.py:1"}


def test_imports_resolve_to_modules_or_their_package(tmp_path):
    root = _package(tmp_path, {
        "top.py": "from pkg import name_in_init, sub\nimport pkg\nimport pkg.sub.x as x\n",
        "sub/x.py": "from .y import thing\nfrom . import z\nfrom .. import top\n",
        "sub/y.py": "from pkg.sub.deep import leaf, helper\n",
        "sub/z.py": "from ..sub import nothing_here\n",
        "sub/deep/leaf.py": ""})
    graph = import_graph(root)
    assert graph["pkg.top"] == {"pkg.sub": "pkg/top.py:1", "pkg.sub.x": "pkg/top.py:3"}
    assert graph["pkg.sub.x"] == {"pkg.sub.y": "pkg/sub/x.py:1", "pkg.sub.z": "pkg/sub/x.py:2",
                                  "pkg.top": "pkg/sub/x.py:3"}
    assert graph["pkg.sub.y"] == {"pkg.sub.deep.leaf": "pkg/sub/y.py:1",
                                  "pkg.sub.deep": "pkg/sub/y.py:1"}   # helper: in deep/__init__
    assert graph["pkg.sub.z"] == {"pkg.sub": "pkg/sub/z.py:1"}   # a name from sub/__init__
    assert check_cycles(root) == [["pkg.sub.x", "pkg.top"]]


def test_importing_a_submodule_runs_its_parent_packages_init(tmp_path):
    root = _package(tmp_path, {"sub/__init__.py": "from pkg import c\n",
                               "c.py": "from pkg.sub.x import thing\n", "sub/x.py": ""})
    assert check_cycles(root) == [["pkg.c", "pkg.sub"]]


def test_no_parent_edge_from_inside_the_package_nor_to_the_top_init(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from pkg import a\n__version__ = '1'\n",
        "a.py": "import pkg\nfrom pkg import __version__\n",
        "sub/__init__.py": "from . import x\n", "sub/x.py": "from pkg.sub import y\n",
        "sub/y.py": ""})
    assert check_cycles(root) == []
    assert import_graph(root)["pkg.sub.x"] == {"pkg.sub.y": "pkg/sub/x.py:1"}


def test_the_package_name_is_a_parameter(tmp_path):
    root = _package(tmp_path, {"a.py": "import other.b\n", "b.py": "import other.a\n"},
                    name="other")
    folder = root.rename(tmp_path / "checkout")
    assert check_cycles(folder, "other") == [["other.a", "other.b"]]
    assert check_cycles(folder) == []          # named after the folder, other.* is foreign


def test_own_imports_inside_functions_are_flagged_others_are_not(tmp_path):
    root = _package(tmp_path, {
        "a.py": "import json\n\ndef f():\n    import json, os\n    from pkg import b\n",
        "b.py": "class C:\n    def m(self):\n        def inner():\n"
                "            from .a import f\n        import pkg.a\n",
        "cli.py": "def main():\n    from pkg import a\n",
        "c.py": "from pkg import a\nasync def g():\n    from collections import deque\n"})
    assert inner_imports(root, allowed={"pkg/cli.py"}) == [
        "pkg/a.py:5: from pkg import b (in f)",
        "pkg/b.py:4: from .a import f (in inner)",
        "pkg/b.py:5: import pkg.a (in m)"]
    assert "pkg/cli.py:2: from pkg import a (in main)" in inner_imports(root)


def test_ruff_flags_long_lines_unused_imports_and_complexity(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    branches = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(15))
    (tmp_path / "a.py").write_text("import os\n\n" + "# " * 51 + "\n\n\n"
                                   f"def f(x):\n{branches}    return -1\n")
    out = ruff(["a.py"], tmp_path).stdout
    for rule in ("F401", "E501", "C901"):
        assert rule in out, out


# ---------------------------------------------------------------- the real package

def _real() -> Path:
    assert (PACKAGE / "__init__.py").is_file(), f"no package at {PACKAGE}"
    return PACKAGE


def test_posttrain_has_no_import_cycles():
    graph = import_graph(_real())
    cycles = check_cycles(_real())
    assert not cycles, f"{len(cycles)} import cycles among module-level imports:\n" + \
        "\n".join(describe_cycle(c, graph) for c in cycles)


def test_posttrain_imports_its_own_modules_only_at_module_level():
    found = inner_imports(_real(), LAZY_IMPORTS_ALLOWED)
    assert not found, f"{len(found)} imports of posttrain inside functions (allowed only in " \
        f"{', '.join(sorted(LAZY_IMPORTS_ALLOWED))}):\n" + "\n".join(found)


def test_the_code_passes_ruff():
    done = ruff(LINTED, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readmes_layout_names_every_module_and_nothing_else():
    """Every module of posttrain/ and script of bench/ is in the README's Layout block, and
    every path the block names exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("\n## Layout\n", 1)[1].split("```\n", 2)[1]
    named, folder = set(), ""
    for line in block.splitlines():
        if not line.strip() or line.startswith(" " * 6):       # a description's next line
            continue
        path = line.split()[0].rstrip(",")
        if line.startswith("  "):                             # inside posttrain/
            path = "posttrain/" + path
        if path.endswith("/") and not line.startswith("  "):
            folder = path
        named.add(path)
        if path.startswith("posttrain/view.py"):
            named.add("posttrain/view.html")
    assert folder, "no Layout block found"
    have = {p.relative_to(ROOT).as_posix() for p in [*PACKAGE.rglob("*.py"),
                                                      *(ROOT / "bench").glob("*.py")]
            if p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(have - named)
    assert not missing, f"modules the README's Layout leaves out: {missing}"
    gone = sorted(p for p in named if not (ROOT / p).exists())
    assert not gone, f"paths the README's Layout names that do not exist: {gone}"
