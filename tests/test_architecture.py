"""The layout's rules, read from the source with ast: a change that breaks one fails here, naming the line.

1. A domain package (preferences, aiconfig, notifications, audit, ops) never imports another domain.
2. The kernel imports nothing of prefd_server outside the kernel.
3. rpc/ (the gRPC edge) imports no domain, nor the wiring (app, cli).
4. SQL appears only in store modules: store.py, *_store.py, and kernel/db.py.
5. gRPC and protobuf (grpc*, google.protobuf, google.rpc, prefd.v1) appear only in rpc/, in a domain's
   service.py / convert.py (or *_service.py / *_convert.py), and in the wiring (app.py, cli/).
6. Every module says its one job in a docstring on its first line, and stays readable in one sitting.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefd_server"
DOMAINS = frozenset({"preferences", "aiconfig", "notifications", "audit", "ops", "statistics"})
WIRING = frozenset({"app", "cli", "__main__"})
EDGE_IMPORTS = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf", "google.rpc", "prefd.v1")
# A string literal that starts like a statement PostgreSQL runs (a keyword with more after it: a bare
# word such as the Redis command SELECT is not a statement; VACUUM and ANALYZE may stand alone).
SQL = re.compile(
    r"^\s*(?:(?:SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|REINDEX|LOCK|LISTEN|NOTIFY|TRUNCATE|"
    r"SET LOCAL)\s+\S|(?:VACUUM|ANALYZE)\b)"
)
MAX_MODULE_LINES = 420


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _part(path: Path) -> str:
    """The top-level part of prefd_server a module belongs to ("kernel", "rpc", a domain, "app", ...)."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _is_store(path: Path) -> bool:
    return path.name == "store.py" or path.stem.endswith("_store") or _name(path) == "prefd_server/kernel/db.py"


def _is_edge(path: Path) -> bool:
    part = _part(path)
    return (
        part == "rpc"
        or part in WIRING
        or path.name in ("service.py", "convert.py")
        or path.stem.endswith(("_service", "_convert"))
    )


def import_problems(path: Path, source: str | None = None) -> list[str]:
    """Every import of the module at `path` (or of `source` judged as if it stood there) that breaks a rule."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    here = _part(path)
    problems = []
    for line, name in _imports(tree):
        where = f"{_name(path)}:{line}"
        if not name.startswith("prefd_server."):
            if not _is_edge(path) and any(name == root or name.startswith(f"{root}.") for root in EDGE_IMPORTS):
                problems.append(f"{where}: gRPC/protobuf outside the edge ({name})")
            continue
        there = name.split(".")[1]
        if here in DOMAINS and there in DOMAINS and there != here:
            problems.append(f"{where}: domain {here} imports domain {there} ({name})")
        elif here == "kernel" and there != "kernel":
            problems.append(f"{where}: the kernel imports {there} ({name})")
        elif here == "rpc" and (there in DOMAINS or there in WIRING):
            problems.append(f"{where}: rpc imports {there} ({name})")
    return problems


def sql_problems(path: Path, source: str | None = None) -> list[str]:
    """Every SQL string literal of a module that is not a store module."""
    if _is_store(path):
        return []
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    return [
        f"{_name(path)}:{node.lineno}: SQL outside a store module ({node.value.strip()[:40]!r})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value)
    ]


def test_the_rules_see_every_part_of_the_package() -> None:
    parts = {_part(path) for path in modules()}
    assert {"kernel", "rpc", "preferences", "aiconfig", "audit", "ops", "app", "cli"} <= parts
    assert len(modules()) > 40


def test_domains_kernel_and_edge_import_only_what_their_layer_may() -> None:
    problems = [problem for path in modules() for problem in import_problems(path)]
    assert not problems, "\n".join(problems)


def test_sql_only_in_store_modules() -> None:
    problems = [problem for path in modules() for problem in sql_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_module_says_its_job_and_fits_in_one_sitting() -> None:
    problems = []
    for path in modules():
        text = path.read_text()
        if not text.strip() and path.name == "__init__.py":
            continue
        if ast.get_docstring(ast.parse(text)) is None or not text.startswith('"""'):
            problems.append(f"{_name(path)}: no docstring on the first line")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{_name(path)}: {lines} lines (at most {MAX_MODULE_LINES})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "rule"),
    [
        (
            "preferences/rules.py",
            "from prefd_server.aiconfig.model import X\n",
            "domain preferences imports domain aiconfig",
        ),
        ("audit/store.py", "import prefd_server.preferences.store\n", "domain audit imports domain preferences"),
        ("preferences/rules.py", "import grpc\n", "gRPC/protobuf outside the edge"),
        ("ops/checks.py", "from prefd.v1 import common_pb2\n", "gRPC/protobuf outside the edge"),
        ("kernel/feed.py", "from prefd_server.preferences.model import Definition\n", "the kernel imports preferences"),
        ("rpc/convert.py", "from prefd_server.preferences.model import Definition\n", "rpc imports preferences"),
    ],
)
def test_an_import_breaking_a_rule_is_named(module: str, source: str, rule: str) -> None:
    problems = import_problems(PACKAGE / module, source)
    assert any(rule in problem for problem in problems), problems


def test_allowed_imports_are_not_named() -> None:
    assert (
        import_problems(PACKAGE / "preferences" / "service.py", "import grpc\nfrom prefd.v1 import common_pb2\n") == []
    )
    assert import_problems(PACKAGE / "aiconfig" / "rules.py", "from prefd_server.kernel.model import Scope\n") == []


def test_sql_outside_a_store_module_is_named() -> None:
    query = 'QUERY = """SELECT key FROM preference_values"""\n'
    assert sql_problems(PACKAGE / "preferences" / "service.py", query)
    assert sql_problems(PACKAGE / "preferences" / "store.py", query) == []
    assert sql_problems(PACKAGE / "preferences" / "service.py", 'HINT = "select a key"\n') == []
    assert sql_problems(PACKAGE / "kernel" / "redis_wire.py", 'COMMAND = ("SELECT", 3)\n') == []
    assert sql_problems(PACKAGE / "kernel" / "redis_wire.py", 'MAINTENANCE = "VACUUM"\n')
