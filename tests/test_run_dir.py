"""The run directory: one owner at a time, no stale temporaries, resume by meaning, recorded changes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.rundir import RunDir, RunDirBusy
from support.snapshot import SnapshotMismatch, SnapshotWriteError, read_snapshot
from toy import toy_config, toy_trainer

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_owner(tmp_path):
    first = toy_trainer(toy_config(tmp_path, total_epochs=1))
    with pytest.raises(RunDirBusy, match=f"{tmp_path} is the run directory of a run still in progress "
                                         f"\\(pid {os.getpid()} on "):
        toy_trainer(toy_config(tmp_path, total_epochs=1))
    assert first.train() == 0  # the refused run changed nothing: the owner finishes normally
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 1]  # eval 0, train 1, eval 1: once each
    assert toy_trainer(toy_config(tmp_path, total_epochs=1)).epochs_run == 1  # free again after train()


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(tmp_path):
    code = ("import os, signal, sys; sys.path.insert(0, '.'); from support.rundir import RunDir; "
            f"RunDir({str(tmp_path)!r}).acquire(); print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert holder.returncode == -signal.SIGKILL and "locked" in holder.stdout
    assert "pid" in (tmp_path / ".lock").read_text()  # its name is still in the file ...
    RunDir(tmp_path).acquire()  # ... but the kernel released its lock


def test_a_held_lock_is_reported_across_processes(tmp_path):
    owner = RunDir(tmp_path)
    owner.acquire()
    code = f"import sys; sys.path.insert(0, '.'); from support.rundir import RunDir; RunDir({str(tmp_path)!r}).acquire()"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and f"(pid {os.getpid()} on" in other.stderr
    owner.release()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_stale_temporaries_of_killed_writes_are_removed_but_never_a_live_writers(tmp_path, capsys):
    toy_trainer(toy_config(tmp_path, total_epochs=1)).train()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended: its temporaries are left over
    stale = [tmp_path / f".snapshot.{dead_pid}.tmp.pt", tmp_path / f".metrics.{dead_pid}.tmp.jsonl",
             tmp_path / ".config.x.tmp.toml"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half a snapshot")
    (tmp_path / "notes.tmp").write_text("not ours")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        live = tmp_path / f".snapshot.{writer.pid}.tmp.pt"  # another process writing right now
        live.write_bytes(b"PK\x03\x04 being written")
        try:
            toy_trainer(toy_config(tmp_path, total_epochs=2)).train()
        finally:
            writer.kill()
    assert not any(path.exists() for path in stale)
    assert live.exists() and (tmp_path / "notes.tmp").exists()
    assert "removed 3 temporary file(s) of interrupted writes" in capsys.readouterr().out


def test_the_same_data_root_spelled_otherwise_is_the_same_run(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    toy_trainer(toy_config(tmp_path / "run", total_epochs=1, data_root=str(tmp_path / "data"))).train()
    for spelling in ("data", "./data/", str(tmp_path / "data") + "/"):
        resumed = toy_trainer(toy_config(tmp_path / "run", total_epochs=1, data_root=spelling))
        assert resumed.epochs_run == 1
        resumed.run_dir.release()
    (tmp_path / "other").mkdir()
    with pytest.raises(SnapshotMismatch, match="belongs to another run .data_root") as refused:
        toy_trainer(toy_config(tmp_path / "run", total_epochs=1, data_root="other"))
    assert "delete" not in str(refused.value)


def test_settings_that_shape_training_cannot_change_on_resume(tmp_path):
    toy_trainer(toy_config(tmp_path, total_epochs=2)).train()
    config_before = (tmp_path / "config.toml").read_text()
    with pytest.raises(SnapshotMismatch, match=r"lr 0.5 -> 0.3, momentum 0.9 -> 0.5 cannot change when a run "
                                               r"resumes.*--config .*config.toml"):
        toy_trainer(toy_config(tmp_path, total_epochs=2, lr=0.3, momentum=0.5))
    assert (tmp_path / "config.toml").read_text() == config_before
    assert not (tmp_path / "resumes.jsonl").exists()


def test_a_resume_records_the_settings_it_changes(tmp_path, capsys):
    toy_trainer(toy_config(tmp_path, total_epochs=2)).train()
    toy_trainer(toy_config(tmp_path, total_epochs=3, eval_every=3)).train()
    assert "resumed with total_epochs 2 -> 3, eval_every 2 -> 3" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert records == [{"epochs_run": 2, "step_in_epoch": 0, "changed": {"total_epochs": [2, 3], "eval_every": [2, 3]}}]
    assert "total_epochs = 3" in (tmp_path / "config.toml").read_text()
    toy_trainer(toy_config(tmp_path, total_epochs=3, eval_every=3)).train()  # nothing changed: no new line
    assert len((tmp_path / "resumes.jsonl").read_text().splitlines()) == 1


def test_a_full_disk_says_the_snapshot_was_not_written_and_the_previous_one_is_intact(tmp_path, monkeypatch):
    t = toy_trainer(toy_config(tmp_path, total_epochs=1))
    t.train()
    before = read_snapshot(tmp_path / "snapshot.pt")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SnapshotWriteError) as refused:
        t._save_snapshot()
    assert str(refused.value) == (f"{tmp_path / 'snapshot.pt'}: the snapshot could not be written (the disk "
                                  f"holding it is full); the previous snapshot there is intact")
    assert read_snapshot(tmp_path / "snapshot.pt").epochs_run == before.epochs_run
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toy_trainer(toy_config(tmp_path, total_epochs=2, tensorboard=True)).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("eval/recall@1", "recall@1"), ("eval/mAP@10", "mAP@10")]:
        logged = [(r["epoch"], r[key]) for r in records if key in r]
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [epoch for epoch, _ in logged], tag
        assert [e.value for e in scalars] == pytest.approx([value for _, value in logged], rel=1e-6), tag


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from support import config
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(config.ConfigError, match="tensorboard: the tensorboard package is not installed; pip install"):
        config.check_extras(config.Config(tensorboard=True))
    config.check_extras(config.Config())
