"""The project's shape: which modules the tools and the launchers pull in."""

import subprocess
import sys


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
