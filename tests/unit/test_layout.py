"""The layers hold what their names say: science in xbl/, clients of outside services in
services/, Prefect steps in tasks/, flows and the CLI in flows/. Beside services/, on its
level: the webhook receiver in webhook/ and the native team stack in infra/. Read from the
source, so a module that crosses a line fails here before it confuses a reader."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Below Prefect: what services/ holds, and the two programs that stand beside it.
BESIDE_SERVICES = ("services", "webhook", "infra")
PACKAGES = ("xbl", *BESIDE_SERVICES, "tasks", "flows")


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if p.name != "__init__.py")


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _decorators(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                found.append(
                    target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                )
    return found


@pytest.mark.parametrize("module", _modules("tasks"), ids=lambda p: p.name)
def test_every_task_module_defines_a_task(module):
    assert "task" in _decorators(module), f"tasks/{module.name} has no @task: is it a client?"


def _below_prefect() -> list[Path]:
    return [m for package in ("xbl", *BESIDE_SERVICES) for m in _modules(package)]


@pytest.mark.parametrize("module", _below_prefect(), ids=lambda p: str(p.relative_to(REPO)))
def test_science_and_services_know_nothing_of_prefect(module):
    assert "prefect" not in _imports(module)


@pytest.mark.parametrize(
    "module",
    [m for package in BESIDE_SERVICES for m in _modules(package)],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_services_import_neither_tasks_nor_flows(module):
    assert not _imports(module) & {"tasks", "flows"}


@pytest.mark.parametrize("module", _modules("services"), ids=lambda p: p.name)
def test_clients_import_neither_the_receiver_nor_the_team_stack(module):
    """services/ holds clients only: the receiver and the team stack use them, not the
    other way round."""
    assert not _imports(module) & {"webhook", "infra"}


@pytest.mark.parametrize("module", _modules("xbl"), ids=lambda p: str(p.relative_to(REPO)))
def test_science_imports_no_service_client(module):
    assert not _imports(module) & {
        "tasks",
        "flows",
        "services",
        "webhook",
        "infra",
        "mlflow",
        "dvc",
        "label_studio_sdk",
    }


@pytest.mark.parametrize("module", _modules("flows"), ids=lambda p: p.name)
def test_flows_hold_flows_or_the_cli(module):
    has_flow = "flow" in _decorators(module)
    assert has_flow or module.name == "cli.py", f"flows/{module.name} defines no @flow"


def test_code_cites_methods_inside_the_repository():
    """Docstrings point to docs/methods.md, which ships with the code."""
    assert (REPO / "docs" / "methods.md").is_file()
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            assert "shared/METHODS.md" not in module.read_text(), module
            assert "(METHODS.md" not in module.read_text(), module


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project's modules that a module imports, by full dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path) :] = 1, [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles_between_modules_or_between_xbls_concerns():
    """A concern's folder can be read before the folders that use it: no two modules import
    each other (directly or round a loop), and neither do two of xbl's subpackages."""
    paths = [p for pkg in PACKAGES for p in _modules(pkg)]
    known = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imported_modules(p, known) - {_module_name(p)} for p in paths}
    assert _cycle(graph) is None, f"modules import each other: {_cycle(graph)}"

    def concern(module: str) -> str:
        return ".".join(module.split(".")[:2])

    concerns: dict[str, set[str]] = {}
    for module, imported in graph.items():
        if module.startswith("xbl."):
            mine = concern(module)
            concerns.setdefault(mine, set()).update(
                concern(m) for m in imported if m.startswith("xbl.") and concern(m) != mine
            )
    assert _cycle(concerns) is None, f"xbl's concerns import each other: {_cycle(concerns)}"


def test_no_client_reaches_into_a_library_s_private_attributes():
    """The SDK's private `_client_wrapper` once carried uploads: a library update may drop it."""
    private = re.compile(r"\b(sdk|client|mlflow|prefect)\._[a-z]\w*")
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("services", "tasks", "flows", "xbl", "webhook")
        for path in (REPO / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert found == []
