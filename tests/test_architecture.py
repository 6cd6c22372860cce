"""The package's layout as a test: imports point down the data flow (import-linter's contracts in
pyproject.toml), no import circles counting function-level imports, no module over 600 lines,
and the few function-level imports of capjob modules only where they keep Ray out of the
preflight (docs/architecture.md)."""

import ast
import pathlib
import subprocess
import sys

from helpers.config import REPO

SRC = REPO / "src"
PACKAGE = SRC / "capjob"
MAX_LINES = 600
# Where a capjob module may be imported inside a function: the preflight boundary (the CLI loads
# the pipeline, and the preflight loads the stages, only once the model check has passed).
LAZY_IMPORTS_ALLOWED = {"capjob.cli", "capjob.preflight"}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_edges(mods: dict[str, pathlib.Path]) -> tuple[dict[str, set[str]], dict[str, list[int]]]:
    """(module -> capjob modules it imports anywhere, module -> lines of its function-level
    capjob imports). A name imported from a package counts as the package and, where it is a
    module, that module too (as ../shared/tools/import_graph.py counts them)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    lazy: dict[str, list[int]] = {}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found = False
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m:
                    graph[m].add(n)
                    found = True
            if found and id(node) in in_function:
                lazy.setdefault(m, []).append(node.lineno)
    return graph, lazy


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def test_import_linter_contracts_are_kept():
    """The layers of pyproject.toml's [tool.importlinter]: an import that points up fails here."""
    result = subprocess.run([str(pathlib.Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_circle_counting_function_level_imports():
    graph, _ = import_edges(modules())
    assert circles(graph) == []


def test_the_circle_check_sees_a_circle_hidden_in_a_function(tmp_path):
    # The check itself: two modules importing each other, one of them inside a function.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    mods = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    graph, lazy = import_edges(mods)
    assert circles(graph) == [["pkg.a", "pkg.b"]] and lazy == {"pkg.b": [2]}


def test_function_level_imports_of_capjob_only_at_the_preflight_boundary():
    _, lazy = import_edges(modules())
    assert set(lazy) <= LAZY_IMPORTS_ALLOWED, {m: lines for m, lines in lazy.items() if m not in LAZY_IMPORTS_ALLOWED}
    for module, lines in lazy.items():
        source = modules()[module].read_text().splitlines()
        for line in lines:
            # Each says why: on its line, or in a comment above its block of imports.
            i, said = line - 1, source[line - 1]
            while i > 0 and source[i - 1].strip().startswith(("from ", "import ", "#")):
                i -= 1
                said += source[i]
            assert "#" in said, f"{module}:{line} imports inside a function without saying why"


def test_no_module_over_600_lines():
    long = {str(f.relative_to(SRC)): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_ruff_passes():
    """The lint the code's `noqa` markers assume (pyproject.toml's [tool.ruff]), unused markers included."""
    result = subprocess.run([str(pathlib.Path(sys.executable).with_name("ruff")), "check", "src", "tests", "bench"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_every_reason_kind_the_stages_set_is_in_the_schema():
    """The quarantine-reason vocabulary lives in schema.py: every ImageRejected kind raised
    anywhere in the package is one of schema.IMAGE_REASON_KINDS."""
    import re

    from capjob.schema import IMAGE_REASON_KINDS

    used = {kind for f in PACKAGE.rglob("*.py") for kind in re.findall(r'ImageRejected\("([a-z_]+)"', f.read_text())}
    assert used and used <= set(IMAGE_REASON_KINDS), used - set(IMAGE_REASON_KINDS)
