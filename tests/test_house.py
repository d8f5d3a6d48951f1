"""The house's own rules, checked on the code: the error tree drawn in errors.py is the tree
the classes make (branch signs included), and the parts the service opens never import
service.py (no circle)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re

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
        "filedispatch/watcher.py",
        *(
            f"filedispatch/{d}/{p.name}"
            for d in ("api", "dispatcher", "journal")
            for p in (ROOT / "filedispatch" / d).glob("*.py")
        ),
    ]
    for path in parts:
        service = {
            m for m in imports_of(path) if m.lstrip(".") in ("service", "filedispatch.service")
        }
        assert not service, f"{path} imports {service}"
