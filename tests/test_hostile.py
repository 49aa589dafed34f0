"""Hostile conditions at the front door: a job of several processes ends with one `error:` line
(the first failing rank's, tagged), a reader that closes the pipe early, Ctrl-C.

The spawn cases run toy workers through support.runtime.spawn, as multigpu.py does, so that they
take seconds; tests/test_launchers.py runs the real launchers on bad data.
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

from arcface.textfile import DataError
from support import errors, runtime
from support.config import ConfigError
from support.errors import one_line_errors

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""}


# ---- one line per job ----

@one_line_errors
def _every_rank_reads_the_same_bad_file(rank: int) -> None:
    raise DataError("data/part.txt:5: expected 3 columns, got 2")


@one_line_errors
def _one_rank_fails_after_the_other_lost_it(rank: int) -> None:
    if rank == 0:  # its collective breaks first, as when the peer tears its process group down
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    time.sleep(0.5)
    raise ConfigError("partial_fc: expected a value in (0, 1], got 2")


@one_line_errors
def _one_rank_is_killed(rank: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


def error_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if "error:" in line]


@pytest.mark.parametrize("main, status, expected", [
    (_one_rank_fails_after_the_other_lost_it, 2, r"error: \[rank 1\] partial_fc: expected a value in \(0, 1\], got 2"),
    (_one_rank_is_killed, 128 + signal.SIGKILL, r"error: \[rank 1\] the process was killed by SIGKILL"),
])
def test_a_spawned_job_ends_with_the_first_real_error_once_tagged_with_its_rank(capfd, main, status, expected):
    assert runtime.spawn(main, args=(), nprocs=2) == status
    err = capfd.readouterr().err
    assert len(error_lines(err)) == 1 and re.fullmatch(expected, error_lines(err)[0]), err
    assert "Terminating process" not in err and "leaked semaphore" not in err and "Traceback" not in err, err


def test_identical_errors_of_torchrun_ranks_print_once_and_torchruns_report_names_them(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    attempt = tmp_path / "run" / "attempt_0"
    files = [attempt / str(rank) / "error.json" for rank in range(2)]
    for file in files:
        file.parent.mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 1 fails first; rank 0 the same way after it
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[rank]))
        with pytest.raises(SystemExit):
            _every_rank_reads_the_same_bad_file(rank)
    assert capsys.readouterr().err.splitlines() == ["error: [rank 1] data/part.txt:5: expected 3 columns, got 2"]
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(files[1]))
    assert failure.message["extraInfo"]["py_callstack"] == "error: [rank 1] data/part.txt:5: expected 3 columns, got 2"
    assert json.loads((attempt / errors.CLAIM_FILE).read_text())["rank"] == 1


def test_a_collective_failure_is_reported_when_no_peer_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(errors.REPORT_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(errors, "COLLECTIVE_GRACE_S", 0.1)
    with pytest.raises(SystemExit) as exited:
        _one_rank_is_killed(0)
    assert exited.value.code == 1
    assert capsys.readouterr().err.startswith("error: [rank 0] a collective operation failed (Connection closed by peer)")


# ---- a bad image reaching the tools, with and without loader workers ----

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A smoke run's snapshot and the synthetic In-Shop root it was trained on."""
    import single_gpu
    from datautils import synthetic_root
    from support.config import parse_config

    out = tmp_path_factory.mktemp("run")
    cfg = parse_config(["1", "1", "--config", str(ROOT / "configs" / "smoke.toml"), "--out_dir", str(out),
                        "--synthetic_dir", str(out / "synthetic")])
    assert single_gpu.main(cfg) == 0
    return out / "snapshot.pt", synthetic_root(cfg)


def corrupt_jpeg(path: Path) -> Path:
    path.write_bytes(b"\xff\xd8\xff\xe0 the rest of this JPEG is missing")
    return path


def text_named_jpg(path: Path) -> Path:
    path.write_text("not an image at all\n")
    return path


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_bad_image_for_search_or_evaluate_is_one_line_with_or_without_loader_workers(
        model, tmp_path, monkeypatch, capfd, workers):
    import shutil

    from tools import evaluate, search
    from tools.common import run_cli

    snapshot, inshop = model
    gallery = tmp_path / "gallery"
    shutil.copytree(inshop / "Img" / "img", gallery)
    bad_gallery = text_named_jpg(next(gallery.rglob("*.jpg")))
    bad_query = corrupt_jpeg(tmp_path / "query.jpg")
    root = tmp_path / "inshop"
    shutil.copytree(inshop, root)
    bad_root_image = corrupt_jpeg(root / "Img" / next(line.split()[0] for line in
                                  (root / "Eval" / "list_eval_partition.txt").read_text().splitlines()[2:]
                                  if line.split()[2] == "gallery"))
    runs = [(search.main, ["search.py", str(snapshot), "--gallery", str(gallery), "--query", str(gallery)], bad_gallery),
            (search.main, ["search.py", str(snapshot), "--gallery", str(inshop), "--query", str(bad_query)], bad_query),
            (evaluate.main, ["evaluate.py", str(snapshot), "--data_root", str(root)], bad_root_image)]
    for main, argv, bad in runs:
        monkeypatch.setattr(sys, "argv", [*argv, "--num_workers", workers])
        assert run_cli(main) == 1
        err = [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines()
               if line.strip() and not line.startswith("embedding")]  # tqdm's progress bar
        assert err == [line for line in err if line.startswith(f"error: {bad}: cannot decode this image: ")] \
            and len(err) == 1, err


# ---- a reader that closes the pipe early ----

def closed_pipe_run(command: list[str], buffered: bool = True) -> subprocess.CompletedProcess:
    """Runs `command` with its stdout a pipe whose reader is already gone (`... | head -0`)."""
    read, write = os.pipe()
    os.close(read)
    environment = {key: value for key, value in env().items() if key != "PYTHONUNBUFFERED" or not buffered}
    try:
        return subprocess.run(command, cwd=ROOT, env=environment, stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    finally:
        os.close(write)


def quiet_about_the_pipe(done: subprocess.CompletedProcess) -> bool:
    return not any(text in done.stderr for text in ("Traceback", "BrokenPipeError", "Exception ignored", "error:"))


@pytest.mark.parametrize("buffered", [True, False], ids=["flushed-at-exit", "unbuffered"])
@pytest.mark.parametrize("entry", [["tools/from_folder.py"], ["-m", "arcface.from_folder"]])
def test_a_closed_pipe_ends_from_folder_quietly(tmp_path, entry, buffered):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for view in range(2):
            Image.new("RGB", (8, 8), (40 * view, 90, 200 if name == "cat" else 10)).save(
                tmp_path / "images" / name / f"{view}.png")
    done = closed_pipe_run([sys.executable, *entry, str(tmp_path / "images"), str(tmp_path / "out")], buffered)
    assert done.returncode == 1 and quiet_about_the_pipe(done), done.stderr
    assert (tmp_path / "out" / "Eval" / "list_eval_partition.txt").is_file()  # the work was done


def test_a_closed_pipe_ends_a_tool_quietly(model):
    snapshot, inshop = model
    done = closed_pipe_run([sys.executable, "tools/search.py", str(snapshot), "--query", str(inshop),
                            "--max_queries", "2", "--num_workers", "0"])
    assert done.returncode == 1 and quiet_about_the_pipe(done), done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["single_gpu.py"], ["multigpu.py", "--nprocs", "2"]])
def test_a_closed_pipe_ends_a_launcher_quietly(tmp_path, model, launcher):
    done = closed_pipe_run([sys.executable, *launcher, "1", "--config", "configs/smoke.toml", "--out_dir",
                            str(tmp_path / "run"), "--synthetic_dir", str(model[1].parent)])
    assert done.returncode == 1 and quiet_about_the_pipe(done), done.stderr[-3000:]


# ---- Ctrl-C ----

class Run:
    """A launcher in a session of its own (as a terminal's job), its output read as it comes."""

    def __init__(self, command: list[str]) -> None:
        import threading

        self.process = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.process.stdout.read(1), ""):
            self.output += chunk

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited with {self.process.returncode} before {what}: {self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s: {self.output[-3000:]}"
            time.sleep(0.05)

    def end(self, timeout: float = 180) -> int:
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.reader.join(10)
        return self.process.returncode


def training_command(out: Path, synthetic: Path, *launcher: str) -> list[str]:
    # 224-pixel crops: a step lasts long enough (a second or more) for a second Ctrl-C to land in it
    return [sys.executable, *launcher, "30", "--config", "configs/smoke.toml", "--out_dir", str(out),
            "--synthetic_dir", str(synthetic), "--resize", "224", "--crop", "224"]


def training_started(out: Path):
    """True once the epoch-0 evaluation is logged: the loop, and its stop signals, are running."""
    metrics = out / "metrics.jsonl"
    return lambda: metrics.is_file() and "recall@1" in metrics.read_text()


def test_ctrl_c_stops_single_gpu_after_the_step_with_a_snapshot(tmp_path, model):
    run = Run(training_command(tmp_path / "run", model[1].parent, "single_gpu.py"))
    run.wait_for(training_started(tmp_path / "run"), "first evaluation")
    os.kill(run.process.pid, signal.SIGINT)
    assert run.end() == 128 + signal.SIGINT, run.output[-3000:]
    assert "stopped by SIGINT at epoch 1 step 1" in run.output and "Traceback" not in run.output, run.output[-3000:]
    assert (tmp_path / "run" / "snapshot.pt").is_file()


def test_a_second_ctrl_c_stops_single_gpu_at_once_without_a_snapshot(tmp_path, model):
    run = Run(training_command(tmp_path / "run", model[1].parent, "single_gpu.py"))
    run.wait_for(training_started(tmp_path / "run"), "first evaluation")
    os.kill(run.process.pid, signal.SIGINT)
    run.wait_for(lambda: "SIGINT received" in run.output, "answer to Ctrl-C")
    os.kill(run.process.pid, signal.SIGINT)
    assert run.end() == 128 + signal.SIGINT, run.output[-3000:]
    assert run.output.rstrip().endswith("interrupted"), run.output[-3000:]
    assert "stopped by SIGINT" not in run.output and "Traceback" not in run.output, run.output[-3000:]
    assert not (tmp_path / "run" / "snapshot.pt").exists()


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_stops_a_spawned_job_after_the_step_with_a_snapshot(tmp_path, model):
    # The terminal sends SIGINT to the whole foreground process group: launcher and workers.
    run = Run(training_command(tmp_path / "run", model[1].parent, "multigpu.py", "--nprocs", "2"))
    run.wait_for(training_started(tmp_path / "run"), "first evaluation")
    os.killpg(run.process.pid, signal.SIGINT)
    assert run.end() == 128 + signal.SIGINT, run.output[-3000:]
    assert "stopped by SIGINT at epoch 1 step 1" in run.output, run.output[-3000:]
    assert "Traceback" not in run.output and "error:" not in run.output, run.output[-3000:]
    assert (tmp_path / "run" / "snapshot.pt").is_file()


@pytest.mark.slow
def test_a_torchrun_job_on_a_bad_partition_file_prints_one_tagged_line_that_torchruns_report_repeats(tmp_path):
    from arcface.synthetic import generate_inshop

    root = tmp_path / "inshop"
    generate_inshop(root, items=12, views=3, size=32, seed=0)
    partition = root / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    lines[4] = lines[4].rsplit(maxsplit=1)[0]
    partition.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "multigpu_torchrun.py", "1", "--config", "configs/smoke.toml", "--data_root", str(root),
                           "--out_dir", str(tmp_path / "run")], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and re.match(rf"error: \[rank [01]\] {partition}:5: expected 3 columns", ours[0]), done.stderr
    assert f"traceback : {ours[0]}" in done.stderr  # torchrun's report shows it, not "To enable traceback ..."
