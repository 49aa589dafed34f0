"""Each launcher runs configs/smoke.toml end to end on the CPU; torchrun restarts resume.

The slowest cases are marked `slow` (not in the default run: `python -m pytest -m slow` runs them);
each behaviour they check also has a faster test in the default run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import errors, runtime
ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


def smoke_args(out_dir: Path, synthetic_dir: str, epochs: int = 2) -> list[str]:
    return [str(epochs), "1", "--config", "configs/smoke.toml", "--out_dir", str(out_dir),
            "--synthetic_dir", synthetic_dir]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def check_complete_run(out_dir: Path, epochs: int) -> None:
    records = lines(out_dir)
    assert [r["epoch"] for r in records if "loss" in r] == list(range(1, epochs + 1))
    evals = [r["epoch"] for r in records if "recall@1" in r]
    assert evals[0] == 0 and evals[-1] == epochs and len(evals) == len(set(evals))
    assert all(0 <= r["recall@1"] <= 100 and 0 <= r["mAP@10"] <= 100 for r in records if "recall@1" in r)
    assert (out_dir / "snapshot.pt").exists() and (out_dir / "config.toml").exists()


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_single_gpu(tmp_path, synthetic_dir):
    run([sys.executable, "single_gpu.py", *smoke_args(tmp_path, synthetic_dir)])
    check_complete_run(tmp_path, 2)


def test_multigpu_spawn_two_cpu_processes(tmp_path, synthetic_dir):
    run([sys.executable, "multigpu.py", *smoke_args(tmp_path, synthetic_dir), "--nprocs", "2"])
    check_complete_run(tmp_path, 2)


def test_torchrun_two_processes(tmp_path, synthetic_dir):
    run(torchrun("--standalone", "--nproc_per_node=2", "multigpu_torchrun.py",
                 *smoke_args(tmp_path, synthetic_dir)))
    check_complete_run(tmp_path, 2)


def test_bad_data_root_names_the_file(tmp_path):
    proc = subprocess.run([sys.executable, "single_gpu.py", "--data_root", str(tmp_path / "inshop")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "list_eval_partition.txt" in proc.stderr


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early with {proc.returncode}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def kill_a_worker(agent: subprocess.Popen) -> None:
    workers = children(agent.pid)
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)


def interrupt_after_first_snapshot(cmd: list[str], snapshot: Path, interrupt, timeout: float = 120,
                                   **popen) -> tuple[int, str]:
    """Starts `cmd`, waits for its first snapshot, calls interrupt(process), waits for the end:
    (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)
    try:
        wait_for(snapshot, proc, timeout=180)
        interrupt(proc)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, output


def sigterm(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)


def test_torchrun_restart_resumes_after_a_worker_is_killed(tmp_path, synthetic_dir):
    cmd = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=2", "multigpu_torchrun.py",
                   *smoke_args(tmp_path, synthetic_dir, epochs=4))
    returncode, output = interrupt_after_first_snapshot(cmd, tmp_path / "snapshot.pt", kill_a_worker, timeout=300)
    assert returncode == 0, output[-4000:]
    assert "resuming from snapshot" in output
    check_complete_run(tmp_path, 4)


@pytest.mark.slow
def test_multigpu_passes_sigterm_to_its_workers_which_stop_with_a_snapshot(tmp_path, synthetic_dir):
    cmd = [sys.executable, "multigpu.py", *smoke_args(tmp_path, synthetic_dir, epochs=12), "--nprocs", "2",
           "--num_workers", "1"]
    returncode, output = interrupt_after_first_snapshot(cmd, tmp_path / "snapshot.pt", sigterm)
    assert returncode == 128 + signal.SIGTERM, output[-4000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output[-4000:]
    assert [r["epoch"] for r in lines(tmp_path) if "loss" in r][-1] < 12
    resumed = run(cmd)
    assert "resuming from snapshot" in resumed.stdout + resumed.stderr
    check_complete_run(tmp_path, 12)


def test_sigterm_to_the_process_group_stops_cleanly_with_loader_workers(tmp_path, synthetic_dir):
    # What Slurm and torchrun do: the signal reaches the loader workers too.
    cmd = [sys.executable, "single_gpu.py", *smoke_args(tmp_path, synthetic_dir, epochs=12), "--num_workers", "1"]
    returncode, output = interrupt_after_first_snapshot(cmd, tmp_path / "snapshot.pt",
                                                        lambda proc: os.killpg(proc.pid, signal.SIGTERM),
                                                        start_new_session=True)
    assert returncode == 128 + signal.SIGTERM, output[-4000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output[-4000:]
    assert output.count("SIGTERM received") == 1, output[-4000:]  # the workers stay quiet


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["single_gpu.py"], ["multigpu.py", "--nprocs", "2"]])
def test_an_error_with_loader_workers_exits(tmp_path, synthetic_dir, launcher):
    cmd = [sys.executable, *launcher, *smoke_args(tmp_path, synthetic_dir), "--num_workers", "1", "--lr", "1e12"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and re.search(r"error: (\[rank \d\] )?non-finite", proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_multinode_two_agents_without_a_shared_file_system(tmp_path):
    """Two torchrun agents (two "nodes") with separate disks: output and data directories."""
    port = runtime.free_port()
    agents = []
    for node in range(2):
        node_dir = tmp_path / f"node{node}"
        cmd = torchrun("--nnodes=2", "--nproc_per_node=1", "--max-restarts=2", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=multinode-test", "multinode.py",
                       *smoke_args(node_dir / "run", str(node_dir / "synthetic"), epochs=4))
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env={**env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        snapshots = [tmp_path / f"node{n}" / "run" / "snapshot.pt" for n in range(2)]
        deadline = time.monotonic() + 240
        while not any(p.exists() for p in snapshots):
            assert all(a.poll() is None for a in agents) and time.monotonic() < deadline
            time.sleep(0.2)
        # kill the worker on the node that does NOT hold the snapshot: its restart must fetch it
        victim = 1 if snapshots[0].exists() else 0
        kill_a_worker(agents[victim])
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    for a, out in zip(agents, outputs):
        assert a.returncode == 0, out[-4000:]
    assert any("resuming from snapshot" in out for out in outputs)
    holders = [p.parent for p in snapshots if p.exists()]
    assert holders
    final = max(holders, key=lambda d: len(lines(d)))
    check_complete_run(final, 4)


def spawned_workers(launcher_pid: int) -> list[int]:
    """mp.spawn's worker processes (not multiprocessing's resource tracker)."""
    return [pid for pid in children(launcher_pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.slow
def test_a_frozen_worker_ends_the_job_after_collective_timeout_s(tmp_path, synthetic_dir):
    cmd = [sys.executable, "multigpu.py", *smoke_args(tmp_path, synthetic_dir, epochs=12), "--nprocs", "2",
           "--collective_timeout_s", "5"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    frozen = None
    try:
        wait_for(tmp_path / "snapshot.pt", launcher, timeout=180)
        frozen = spawned_workers(launcher.pid)[-1]
        os.kill(frozen, signal.SIGSTOP)
        start = time.monotonic()
        output, _ = launcher.communicate(timeout=150)
        waited = time.monotonic() - start
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.kill()
    assert launcher.returncode == 1, output[-4000:]
    assert "a collective operation failed" in output and "collective_timeout_s" in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    # the timeout, the rank's wait for a peer's line, the launcher's grace periods before SIGTERM and SIGKILL, slack
    assert waited < 5 + errors.COLLECTIVE_GRACE_S + 2 * runtime.SPAWN_GRACE_S + 60


def _relative_differences(a: dict, b: dict) -> dict[str, float]:

    return {k: float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12))
            for k in b if b[k].is_floating_point() and "running" not in k}


@pytest.mark.slow
def test_a_two_process_run_stopped_mid_epoch_resumes_under_single_gpu(tmp_path, synthetic_dir):
    import torch

    batch = ["--global_batch_size", "16", "--batch_size", "8"]
    full = tmp_path / "full"
    run([sys.executable, "multigpu.py", *smoke_args(full, synthetic_dir, epochs=4), "--nprocs", "2", *batch])
    stopped = tmp_path / "stopped"
    cmd = [sys.executable, "multigpu.py", *smoke_args(stopped, synthetic_dir, epochs=4), "--nprocs", "2", *batch]
    returncode, output = interrupt_after_first_snapshot(cmd, stopped / "snapshot.pt", sigterm)
    assert returncode == 128 + signal.SIGTERM, output[-4000:]
    resumed = run([sys.executable, "single_gpu.py", *smoke_args(stopped, synthetic_dir, epochs=4), *batch])
    assert "resuming from snapshot" in resumed.stdout
    check_complete_run(stopped, 4)
    load = lambda d: torch.load(d / "snapshot.pt", weights_only=True)["model"]
    differences = _relative_differences(load(stopped), load(full))
    assert max(differences.values()) < 1e-3, sorted(differences.items(), key=lambda kv: -kv[1])[:3]


def _bomb_jpeg(path: Path) -> None:
    """A valid little JPEG whose frame header claims 20000 x 20000 pixels."""
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, "JPEG")
    data = bytearray(path.read_bytes())
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width
    path.write_bytes(bytes(data))


def _damage(root: Path, kind: str) -> str:
    """Damages a generated In-Shop root; returns what the error line must say."""
    partition = root / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    train_image = root / "Img" / lines[2].split()[0]
    if kind == "row":
        lines[4] = lines[4].rsplit(maxsplit=1)[0]
        partition.write_text("\n".join(lines) + "\n")
        return f"{partition}:5: expected 3 columns"
    if kind == "utf8":
        partition.write_bytes(partition.read_bytes().replace(b"id_00000002", b"id_0000\xff002", 1))
        return f"{partition}:"
    if kind == "bomb":
        _bomb_jpeg(train_image)
        return f"{train_image}"
    train_image.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")  # kind == "corrupt"
    return f"{train_image}"


SLOW = pytest.mark.slow


@pytest.mark.parametrize("launcher, kind", [
    (["single_gpu.py"], "row"), pytest.param(["single_gpu.py"], "utf8", marks=SLOW),
    pytest.param(["single_gpu.py"], "bomb", marks=SLOW), pytest.param(["single_gpu.py"], "corrupt", marks=SLOW),
    pytest.param(["multigpu.py", "--nprocs", "2"], "row", marks=SLOW),
    (["multigpu.py", "--nprocs", "2"], "bomb"),  # raised in a loader worker of one rank
])
def test_bad_data_ends_in_one_line_naming_the_file(tmp_path, launcher, kind):
    from arcface.synthetic import generate_inshop

    root = tmp_path / "inshop"
    generate_inshop(root, items=12, views=3, size=32, seed=0)
    expected = _damage(root, kind)
    cmd = [sys.executable, *launcher, "1", "--config", "configs/smoke.toml", "--data_root", str(root),
           "--out_dir", str(tmp_path / "run"), "--num_workers", "1", "--batch_size", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line[line.index("error:"):] for line in proc.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    # One line per job, the rank that read the file naming it (tagged when there are several);
    # a rank left waiting for it says nothing, and mp.spawn's "Terminating process" is not shown.
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("error: [rank ") == (launcher[0] == "multigpu.py"), proc.stderr[-3000:]
    assert "Terminating process" not in proc.stderr and "leaked semaphore" not in proc.stderr, proc.stderr[-3000:]


def test_elastic_torchrun_survives_losing_a_node(tmp_path, synthetic_dir):
    """Two agents (`--nnodes=1:2`) on localhost; agent B and its worker are SIGKILLed after the first
    snapshot. Agent A, which hosts the c10d store and so must survive, re-forms the job on one
    process, which resumes from the snapshot with the same global batch and finishes."""
    port = runtime.free_port()
    out = tmp_path / "run"
    cmd = torchrun("--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=elastic-test",
                   # drop a silent node after 5 s instead of 15, and re-form 2 s after the last change
                   "--rdzv-conf=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=5",
                   "multinode.py", *smoke_args(out, synthetic_dir, epochs=6),
                   "--global_batch_size", "16", "--batch_size", "8")
    survivor = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)  # the first agent binds the endpoint and hosts the store
    lost = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(out / "snapshot.pt", survivor, timeout=240)
        for pid in [*children(lost.pid), lost.pid]:  # torchrun's worker runs in a session of its own
            os.kill(pid, signal.SIGKILL)
        output, _ = survivor.communicate(timeout=300)
    finally:
        for agent in (survivor, lost):
            for pid in children(agent.pid):
                os.kill(pid, signal.SIGKILL)
            agent.kill()
    assert survivor.returncode == 0, output[-4000:]
    assert re.search(r"global rank \d of 2,", output) and "global rank 0 of 1," in output, output[-4000:]
    assert "resuming from snapshot" in output, output[-4000:]
    check_complete_run(out, 6)


@pytest.mark.slow
def test_partial_fc_under_multigpu_equals_the_dense_run_and_resumes_under_single_gpu(tmp_path, synthetic_dir):
    import torch

    batch = ["--global_batch_size", "16", "--batch_size", "8"]
    runs = {"dense": [], "dense_channels_last": ["--channels_last"], "sharded": ["--partial_fc", "1.0"]}
    for name, flags in runs.items():
        run([sys.executable, "multigpu.py", *smoke_args(tmp_path / name, synthetic_dir, epochs=2), "--nprocs", "2",
             *batch, *flags])
    load = lambda name: torch.load(tmp_path / name / "snapshot.pt", weights_only=True)["model"]
    dense = load("dense")
    largest = lambda other: max((other[k] - dense[k]).abs().max().item() for k in dense
                                if dense[k].is_floating_point() and "running" not in k)
    # ArcFace at s = 64 amplifies float rounding over the steps: the dense run differs from itself
    # with other conv kernels (channels_last) by this much, and the sharded head may not differ more.
    rounding = largest(load("dense_channels_last"))
    assert 0 < largest(load("sharded")) < max(3 * rounding, 1e-4), (largest(load("sharded")), rounding)
    assert load("sharded")["head.weight"].shape == dense["head.weight"].shape  # saved dense
    resumed = run([sys.executable, "single_gpu.py", *smoke_args(tmp_path / "sharded", synthetic_dir, epochs=3),
                   *batch, "--partial_fc", "1.0"])
    assert "resuming from snapshot" in resumed.stdout
    check_complete_run(tmp_path / "sharded", 3)
    evaluated = run([sys.executable, "tools/evaluate.py", str(tmp_path / "sharded" / "snapshot.pt"),
                     "--num_workers", "0"])
    assert "recall@1" in evaluated.stdout
