"""The house's own rules, checked on the code: the error tree drawn in errors.py is the tree
the classes make, the parts the service opens never import service.py, the imports make no
circle at all, every speed-up is behind fastpath.py's switch, and no class grows past 400
lines."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import filedispatch
from filedispatch import errors

from .conftest import ROOT

TREE_LINE = re.compile(r"^(?P<indent>[│ ]*)(?:├── |└── )?(?P<name>[A-Z]\w+)(?:\s|$)")


def drawn_lines() -> list[tuple[int, str, str]]:
    """(depth, branch sign, class name) of each class line of errors.py's drawing."""
    assert errors.__doc__ is not None
    lines = []
    for line in errors.__doc__.splitlines():
        m = TREE_LINE.match(line)
        if m is None or not m.group("name").endswith(("Error", "NotFound")):
            continue
        if not line.startswith(("FileDispatchError", "│", "├", "└", " ")):
            continue
        depth = 0 if line.startswith("FileDispatchError") else len(m.group("indent")) // 4 + 1
        sign = line[len(m.group("indent")) : len(m.group("indent")) + 4]
        lines.append((depth, sign, m.group("name")))
    return lines


def drawn_tree() -> dict[str, str | None]:
    """{class name: parent name} as drawn in errors.py's docstring."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for depth, _, name in drawn_lines():
        del stack[depth:]
        parents[name] = stack[-1] if stack else None
        stack.append(name)
    return parents


def every_module() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(filedispatch.__path__, "filedispatch.")
        if not m.name.endswith("__main__")
    ]


def test_the_error_tree_drawn_is_the_tree_of_the_classes() -> None:
    for name in every_module():
        importlib.import_module(name)
    actual: dict[str, str | None] = {"FileDispatchError": None}
    todo = [errors.FileDispatchError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            assert sub.__module__ == "filedispatch.errors", f"{sub} is defined outside errors.py"
            actual[sub.__name__] = cls.__name__
            todo.append(sub)
    assert drawn_tree() == actual


def test_the_drawing_has_its_branch_signs_right() -> None:
    """The last child of a class is drawn with └──, the others with ├── (NotFound was drawn
    as a last child above its sibling FencedError)."""
    lines = drawn_lines()
    for i, (depth, sign, name) in enumerate(lines):
        if depth == 0:
            continue
        after = next((d for d, _, _ in lines[i + 1 :] if d <= depth), 0)
        expected = "├── " if after == depth else "└── "
        assert sign == expected, f"{name} is drawn with {sign!r}, not {expected!r}"


def test_the_drawing_is_read_as_drawn() -> None:
    """The reader above can fail: a class drawn under the wrong parent is seen."""
    tree = drawn_tree()
    assert tree["SourceUnreadableError"] == "TransientDeliveryError"
    assert tree["SourceVanishedError"] == "PermanentDeliveryError"
    assert tree["JournalUnavailableError"] == "JournalError"
    assert tree["DeliveryError"] == "FileDispatchError"


def imports_of(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(("." * node.level) + node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_part_the_service_opens_imports_the_service() -> None:
    """service -> monitor/progress/api/history -> service was a circle; they get a
    ServiceLink (link.py) and the journal's file helpers (journal/place.py) instead."""
    parts = [
        "filedispatch/monitor.py",
        "filedispatch/progress.py",
        "filedispatch/history.py",
        *(
            f"filedispatch/{d}/{p.name}"
            for d in ("api", "dispatcher", "journal", "watcher")
            for p in (ROOT / "filedispatch" / d).glob("*.py")
        ),
    ]
    for path in parts:
        service = {
            m for m in imports_of(path) if m.lstrip(".") in ("service", "filedispatch.service")
        }
        assert not service, f"{path} imports {service}"


def _imported(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of filedispatch ``module`` imports, at its top or inside a function (an
    import put inside a function hides a circle; it does not remove it); imports under
    ``if TYPE_CHECKING`` are for the type checker only and are left out."""
    found: set[str] = set()

    def visit(nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join([*package, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                subs = {f"{base}.{a.name}" for a in node.names} & known
                found.update(subs)
                if len(subs) < len(node.names) and base in known:
                    found.add(base)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit(inner)

    visit(list(tree.body))
    found.discard(module)
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """The circles of the import graph of the package under ``root`` (each a sorted list)."""
    names = {}
    for path in sorted((root / "filedispatch").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    known = set(names)
    graph = {
        m: _imported(m, p.name == "__init__.py", ast.parse(p.read_text(encoding="utf-8")), known)
        for m, p in names.items()
    }
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in graph:
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
                    cycles.append(sorted(component))
    return cycles


def test_the_import_graph_has_no_circle() -> None:
    """Data flows one way, and so do imports: no circle, not even one hidden by an import
    inside a function (sourcefile -> watcher and config -> controls were two such)."""
    assert import_cycles(ROOT) == []


def test_the_circle_finder_finds_a_circle(tmp_path: Path) -> None:
    """The finder above can fail: a circle through an import inside a function is seen."""
    package = tmp_path / "filedispatch"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    assert import_cycles(tmp_path) == [["filedispatch.a", "filedispatch.b"]]


#: the calls that are speed-ups, each of which FILEDISPATCH_FASTPATH=0 must turn off
FAST_CALLS = re.compile(
    r"renameat2|sync_file_range|RWF_NOWAIT|FICLONE|ioctl|inotify_add_watch|os\.(copy_file_range|sendfile)\("
)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines of ``path`` that are code, not comment or docstring."""
    text = path.read_text(encoding="utf-8")
    docs: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return [
        (i, line.split("#", 1)[0])
        for i, line in enumerate(text.splitlines(), 1)
        if i not in docs and line.split("#", 1)[0].strip()
    ]


def test_every_speed_up_is_behind_the_switch() -> None:
    """The fast calls are made in fastpath.py, which turns them off when
    FILEDISPATCH_FASTPATH=0; the one exception is processors/local.copy_data's kernel copies,
    which ask fastpath.KERNEL_COPY first. ctypes is used by fastpath.py, by sourcefile.py
    (openat2, a safety path whose fallback walk the tests run too) and by birth.py (statx, for
    the birth time the API shows: a fact, not a speed-up; None where it is missing) only."""
    for path in sorted((ROOT / "filedispatch").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "filedispatch/fastpath.py":
            continue
        for number, code in _code_lines(path):
            where = f"{rel}:{number}: {code.strip()}"
            if "ctypes" in code:
                assert rel in ("filedispatch/sourcefile.py", "filedispatch/birth.py"), where
            if FAST_CALLS.search(code):
                assert rel == "filedispatch/processors/local.py", where
                assert re.search(r"os\.(copy_file_range|sendfile)\(", code), where
    local = (ROOT / "filedispatch/processors/local.py").read_text(encoding="utf-8")
    copy_data = local[local.index("def copy_data(") : local.index("def _data_extents(")]
    assert "fastpath.KERNEL_COPY" in copy_data


#: the longest a class may be, in lines (docstring and blank lines included)
CLASS_LINES = 400
#: the classes still over it, each held at its present size until it is split (none now: the
#: watcher, at 676 lines, gave its entries, readiness gates and batches to watcher/; the SQLite
#: journal, at 657, its writer, schema, upkeep and readers to journal/sqlite_*.py; the
#: PostgreSQL journal, at 723, its writer, upkeep, schema and leases to journal/pg*.py).
OVERSIZE: dict[str, int] = {}


def test_no_class_grows_past_four_hundred_lines() -> None:
    """One job per class: none is over CLASS_LINES lines, and the few that still are (see
    OVERSIZE) only shrink. Service, at 478 lines, gave its status snapshot to link.py, its
    start-up clean-up to recovery.py and its wait for the journal to journal/backends.py."""
    sizes = {}
    for path in sorted((ROOT / "filedispatch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                name = f"{path.relative_to(ROOT)}:{node.name}"
                sizes[name] = (node.end_lineno or node.lineno) - node.lineno + 1
    over = {name: n for name, n in sizes.items() if n > OVERSIZE.get(name, CLASS_LINES)}
    assert over == {}, f"classes over {CLASS_LINES} lines (split them): {over}"
    assert all(name in sizes for name in OVERSIZE), "a class in OVERSIZE is gone: remove it"
