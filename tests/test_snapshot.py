"""Snapshot files: one reader for the Trainer and the tools, which refuses damage, foreign formats and
a second owner, naming the file and the field."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from support.rundir import RunDirBusy
from arcface.model import preprocessing_for
from arcface.transforms import IMAGENET
from support.snapshot import (CHECKSUM_KEY, SNAPSHOT_KEYS, SNAPSHOT_VERSION, SnapshotError, SnapshotMismatch, checksum,
                              read_snapshot, write_snapshot)
from toy import toy_config, toy_trainer
from tools.common import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    toy_trainer(toy_config(out, total_epochs=1)).train()
    return out / "snapshot.pt"


def _copy(trained: Path, tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.pt"
    shutil.copy(trained, path)
    return path


def _raw(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_snapshot_round_trips_with_its_checksum(trained, tmp_path):
    snapshot = read_snapshot(trained)
    assert set(_raw(trained)) == {*SNAPSHOT_KEYS, CHECKSUM_KEY}
    copy = tmp_path / "copy.pt"
    write_snapshot(snapshot, copy)
    again = read_snapshot(copy)
    assert again.epochs_run == snapshot.epochs_run == 1
    assert _raw(copy)[CHECKSUM_KEY] == _raw(trained)[CHECKSUM_KEY]  # the contents, not the file layout


def test_the_checksum_sees_one_changed_number_anywhere():
    contents = {"model": {"w": torch.zeros(4)}, "history": [{"epoch": 1, "loss": 0.5}], "n": 3}
    reference = checksum(contents)
    changed = [
        {**contents, "model": {"w": torch.tensor([0.0, 0.0, 1e-30, 0.0])}},
        {**contents, "model": {"w": torch.zeros(4, dtype=torch.float64)}},
        {**contents, "model": {"w": torch.zeros(2, 2)}},
        {**contents, "history": [{"epoch": 1, "loss": 0.5000001}]},
        {**contents, "n": 3.0},
        {**contents, "n": "3"},
    ]
    assert all(checksum(other) != reference for other in changed)
    assert checksum({**contents, CHECKSUM_KEY: "anything"}) == reference


def test_bytes_overwritten_inside_a_snapshot_are_refused_naming_the_file(trained, tmp_path):
    path = _copy(trained, tmp_path)
    data = bytearray(path.read_bytes())
    # The largest tensor's bytes: find them and overwrite 4 KB in their middle.
    weight = read_snapshot(trained).model["embedding.weight"]
    raw = weight.numpy().tobytes()
    start = bytes(data).find(raw)
    assert start > 0
    middle = start + len(raw) // 2 - 16
    data[middle:middle + 32] = os.urandom(32)  # the weight is small in the toy: all of it that fits
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=f"^{path}: its contents do not match the checksum") as refused:
        read_snapshot(path)
    assert "damaged" in str(refused.value)
    # 4 KB anywhere in the middle of the file: refused one way or the other, never loaded.
    data = bytearray(trained.read_bytes())
    data[len(data) // 2 - 2048:len(data) // 2 + 2048] = os.urandom(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=f"^{path}: "):
        read_snapshot(path)


@pytest.mark.parametrize("field, value, message", [
    ("step_in_epoch", -3, r"field step_in_epoch: expected an integer in \[0, 7\], got -3"),
    ("step_in_epoch", 8, r"field step_in_epoch: expected an integer in \[0, 7\], got 8"),
    ("epochs_run", "1", "field epochs_run: expected an integer, got str"),
    ("epochs_run", True, "field epochs_run: expected an integer, got bool"),
    ("steps_per_epoch", 0, r"field steps_per_epoch: expected an integer >= 1, got 0"),
    ("global_batch", 2.5, "field global_batch: expected an integer, got float"),
    ("num_classes", -1, "field num_classes: expected an integer >= 1"),
    ("history", [{"epoch": 1}, {"epoch": 0}], "field history: epochs out of order"),
    ("history", [{"epoch": 5}], r"field history: expected records with an epoch in \[0, 1\]"),
    ("model", {"w": [1.0]}, "field model: expected a state dict of named tensors"),
    ("optimizer", {"state": {}}, "field optimizer: expected an optimizer state dict"),
    ("rng", {"torch": torch.zeros(3)}, "field rng: expected the CPU generator's state"),
    ("config", [], "field config: expected a dict, got list"),
    ("preprocessing", {"mean": [0.5, 0.5], "std": [0.5] * 3, "interpolation": "bicubic"},
     r"field preprocessing mean: expected 3 numbers \(R, G, B\)"),
    ("preprocessing", {"mean": [0.5] * 3, "std": [0.5] * 3}, "field preprocessing: missing interpolation"),
])
def test_a_damaged_field_is_refused_naming_the_file_and_the_field(trained, tmp_path, field, value, message):
    # Written with a valid checksum: the damage is in what was saved, not in the bytes.
    path = tmp_path / "snapshot.pt"
    contents = {**_raw(trained), field: value}
    contents[CHECKSUM_KEY] = checksum(contents)
    torch.save(contents, path)
    with pytest.raises(SnapshotError, match=f"^{path}: {message}") as refused:
        read_snapshot(path)
    assert str(refused.value).endswith("the snapshot is damaged")


def test_the_snapshot_records_the_preprocessing_and_a_resume_keeps_it(tmp_path):
    clip = "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"  # CLIP's mean and std, bicubic
    pytest.importorskip("timm")
    cfg = toy_config(tmp_path, total_epochs=1, arch=clip, resize=36, crop=32)  # (the toy model trains)
    toy_trainer(cfg).train()
    recorded = read_snapshot(tmp_path / "snapshot.pt").preprocessing
    assert recorded == preprocessing_for(clip).as_dict() != IMAGENET.as_dict()
    assert recorded["interpolation"] == "bicubic" and recorded["mean"][0] == pytest.approx(0.4815, abs=1e-4)
    # Another timm could give the tag other statistics: the images would change mid-run.
    path = tmp_path / "snapshot.pt"
    write_snapshot(dataclasses.replace(read_snapshot(path), preprocessing=IMAGENET.as_dict()), path)
    with pytest.raises(SnapshotMismatch, match=f"^{path} trained on images preprocessed with .*'bilinear'.*, but "
                                               f"{clip} now gives .*'bicubic'"):
        toy_trainer(toy_config(tmp_path, total_epochs=2, arch=clip, resize=36, crop=32))


def test_a_snapshot_written_before_the_preprocessing_was_recorded_reads_as_imagenets(trained, tmp_path):
    # Every run then used ImageNet's statistics and a bilinear resize, whatever its arch.
    path = tmp_path / "snapshot.pt"
    contents = {key: value for key, value in _raw(trained).items() if key != "preprocessing"}
    contents[CHECKSUM_KEY] = checksum(contents)
    torch.save(contents, path)
    assert read_snapshot(path).preprocessing == IMAGENET.as_dict()
    assert toy_trainer(toy_config(tmp_path, total_epochs=2)).epochs_run == 1  # and it resumes


def test_a_position_outside_the_epoch_never_resumes(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = _copy(trained, out)
    write_snapshot(dataclasses.replace(read_snapshot(path), step_in_epoch=-3), path)
    with pytest.raises(SnapshotError, match=r"field step_in_epoch: expected an integer in \[0, 7\], got -3"):
        toy_trainer(toy_config(out, total_epochs=2))


def test_another_format_version_is_refused_by_the_trainer_and_every_tool(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = _copy(trained, out)
    contents = {**_raw(trained), "format_version": 1}
    contents[CHECKSUM_KEY] = checksum(contents)
    torch.save(contents, path)
    expected = (f"^{path}: snapshot format 1, but this version of the project reads format {SNAPSHOT_VERSION} "
                "only; use the version that wrote it")
    with pytest.raises(SnapshotError, match=expected):
        toy_trainer(toy_config(out, total_epochs=2))
    with pytest.raises(SnapshotError, match=expected):
        load_model(path)  # tools/evaluate.py, search.py, export.py and the Python API read through it


def test_two_runs_never_share_a_snapshot_file(tmp_path):
    shared = tmp_path / "shared" / "s.pt"
    first = toy_trainer(toy_config(tmp_path / "a", total_epochs=1, snapshot=str(shared)))
    with pytest.raises(RunDirBusy, match=f"^{shared} is the snapshot file of a run still in progress "
                                         fr"\(pid {os.getpid()} on "):
        toy_trainer(toy_config(tmp_path / "b", total_epochs=1, snapshot=str(shared)))
    assert not (tmp_path / "b" / "config.toml").exists()  # refused before anything was written
    assert first.train() == 0
    second = toy_trainer(toy_config(tmp_path / "b", total_epochs=2, snapshot=str(shared)))  # free again
    assert second.epochs_run == 1  # it continues the snapshot it now owns
    second.run_dir.release()


def test_a_contributor_adds_a_field_with_one_line(tmp_path):
    """One `_setting` line in config.py: the resume policy, the TOML round trip and --help know it."""
    shutil.copytree(ROOT / "support", tmp_path / "support")
    config_file = tmp_path / "support" / "config.py"
    text = config_file.read_text()
    anchor = '    log_every: int = _setting('
    assert text.count(anchor) == 1
    added = ('    eval_note: int = _setting(7, "a knob a contributor adds", resumable=True, at_least=0)\n'
             '    train_knob: float = _setting(0.5, "a knob that shapes training")\n')
    config_file.write_text(text.replace(anchor, added + anchor))
    probe = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]
        import support.config as config
        assert config.__file__.startswith({str(tmp_path)!r})
        from support.snapshot import config_changes
        assert "eval_note" in config.RESUMABLE and "train_knob" not in config.RESUMABLE
        cfg = config.Config(eval_note=9, train_knob=0.25)
        text = config.dump_toml(cfg)
        assert "eval_note = 9" in text and "train_knob = 0.25" in text
        assert config.from_plain(__import__("tomllib").loads(text)) == cfg
        assert config.from_plain(config.to_plain(cfg)) == cfg
        try:
            config.Config(eval_note=-1)
            raise SystemExit("a bound on the field was not applied")
        except config.ConfigError as error:
            assert str(error) == "eval_note: expected a value >= 0, got -1", error
        help_text = config.arg_parser().format_help()
        assert "--eval_note INT" in help_text and "a knob a contributor adds (default: 7)" in help_text
        assert config.parse_config(["--eval_note", "3"]).eval_note == 3
        saved = config.to_plain(config.Config())
        changes = config_changes(saved, cfg)
        assert set(changes) == {{"eval_note", "train_knob"}}
        print("resumable:", sorted(k for k in changes if k in config.RESUMABLE))
        # The resume check itself: changing the resumable field passes, the other is refused.
        import torch
        from pathlib import Path
        from support.schedule import make_schedule
        from support.snapshot import SNAPSHOT_VERSION, Snapshot, SnapshotMismatch, check_resume
        def snapshot_of(values):
            schedule = make_schedule(values, 320, world_size=1)
            return Snapshot(SNAPSHOT_VERSION, {{}}, {{}}, {{}}, 0, 0, schedule.steps_per_epoch,
                            schedule.global_batch, 4, config.to_plain(values), [], {{}}, {{}}), schedule
        snapshot, schedule = snapshot_of(config.Config())
        assert check_resume(snapshot, Path("s.pt"), config.Config(eval_note=9), 4, schedule) == {{"eval_note": (7, 9)}}
        try:
            check_resume(snapshot, Path("s.pt"), config.Config(train_knob=0.25), 4, schedule)
            raise SystemExit("a change of a field that shapes training was accepted on resume")
        except SnapshotMismatch as refused:
            assert "train_knob 0.5 -> 0.25 cannot change when a run resumes" in str(refused), refused
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "resumable: ['eval_note']"
