"""The project's shape: which modules the tools and the launchers pull in, and what imports what."""

import ast
import re
import subprocess
import sys
from pathlib import Path


def _imported_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_tools_read_snapshots_without_importing_the_trainer():
    modules = _imported_by("import tools.evaluate, tools.search, tools.export, tools.visualize, tools.common")
    assert "support.snapshot" in modules
    assert "trainer" not in modules


def test_importing_runtime_registers_no_exit_hook():
    # The loader-worker cleanup is registered by the loaders that need it, not as an import side effect.
    code = ("import multiprocessing.util as u; before = len(u._finalizer_registry); from support import runtime; "
            "after = len(u._finalizer_registry); runtime.stop_signal_safe_workers(); "
            "runtime.stop_signal_safe_workers(); print(before, after, len(u._finalizer_registry))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, registered = map(int, result.stdout.split())
    assert after == before and registered == before + 1


ROOT = Path(__file__).resolve().parents[1]
SERIES = {"single_gpu", "multigpu", "multigpu_torchrun", "multinode", "trainer", "datautils"}


def _project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project (tests aside)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in ("tests", ".git") or any(part.startswith(".") for part in parts):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its file: at the top, inside functions, under
    TYPE_CHECKING (an import a type checker follows is a dependency too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]  # support.config.Config -> support.config
            if target and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    modules = _project_modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert graph["trainer"] >= {"support.snapshot", "support.config"}  # the scan sees imports
    assert "support.schedule" in graph["datautils"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds one


def test_the_root_holds_the_series_and_one_more_module():
    root_modules = {path.stem for path in ROOT.glob("*.py")}
    assert SERIES <= root_modules
    assert len(root_modules - SERIES) <= 1, root_modules - SERIES


def test_partial_fc_is_named_once_in_the_trainer():
    text = (ROOT / "trainer.py").read_text().lower()
    assert len(re.findall(r"partial[ _]fc|partialfc", text)) <= 1


def test_snapshots_are_read_and_indexed_in_one_module():
    from support.snapshot import SNAPSHOT_KEYS

    # Keys that name nothing but a snapshot's field ("model" or "best" name other things too, and
    # other file formats have a format_version of their own).
    distinctive = [key for key in SNAPSHOT_KEYS if "_" in key and key != "format_version"]
    assert {"epochs_run", "step_in_epoch", "steps_per_epoch"} <= set(distinctive)
    indexed = re.compile("|".join(fr"""(\[|\.get\()["']{key}["']""" for key in distinctive))
    sources = {path.relative_to(ROOT).as_posix(): path.read_text() for path in ROOT.rglob("*.py")
               if "tests" not in path.parts}
    assert {name for name, text in sources.items() if indexed.search(text)} <= {"support/snapshot.py"}
    # arcface/model.py reads weight files; tools/search.py its own search index.
    loaders = {name for name, text in sources.items() if "torch.load(path" in text}
    assert loaders <= {"support/snapshot.py", "arcface/model.py", "tools/search.py"}, loaders
