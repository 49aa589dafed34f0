import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from toy import (
    spawn,
    MyTrainDataset,
    ToyModel,
    init_gloo,
    toy_config,
    toy_eval_sets,
    toy_trainer,
)

from arcface.retrieval import evaluate_retrieval
from datautils import EpochSampler
from job import load_train_objs
from support import runtime
from support.config import Config, load_toml
from support.schedule import lr_schedule, steps_per_epoch
from support.snapshot import (
    SNAPSHOT_VERSION,
    SnapshotError,
    SnapshotMismatch,
    read_snapshot,
    write_snapshot,
)
from trainer import Trainer


def read_lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_epochs(lines: list[dict]) -> list[int]:
    return [r["epoch"] for r in lines if "loss" in r]


def assert_same_weights(a: dict, b: dict, tol: float = 0.0) -> None:
    """Equal weights; `tol` (relative and absolute) allows for another float summation order."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


# ---------------------------------------------------------------------------------------
# Schedule and sampler


def test_lr_schedule_warmup_then_cosine():
    lrs = lr_schedule(1.0, epochs=10, steps_per_epoch=10, warmup_epochs=2, warmup_factor=0.01, min_lr=0.1)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(0.01 + 0.99 * 10 / 20)  # linear ramp, halfway
    assert lrs[20] == pytest.approx(1.0)  # the cosine starts at the full rate
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 40 / 80)))
    assert np.all(np.diff(lrs[20:]) <= 0) and lrs[-1] > 0.1


def test_load_train_objs_is_seeded_and_scales_lr(tmp_path):
    values = load_toml("configs/smoke.toml") | dict(synthetic_dir=str(tmp_path), seed=3, lr=0.32, lr_batch_size=64)
    cfg = Config(**values)
    first, again = load_train_objs(cfg), load_train_objs(cfg)
    other = load_train_objs(dataclasses.replace(cfg, seed=4))
    assert_same_weights(first.model.state_dict(), again.model.state_dict())
    assert not torch.equal(first.model.head.weight, other.model.head.weight)
    assert first.optimizer.param_groups[0]["lr"] == pytest.approx(0.32 * cfg.batch_size / 64)
    assert (len(first.train_set), len(first.query_set) + len(first.gallery_set)) == (12 * 4, 12 * 4)


def test_load_train_objs_loads_pretrained_weights_and_says_what_it_left_out(tmp_path, capsys):
    values = load_toml("configs/smoke.toml") | dict(synthetic_dir=str(tmp_path))
    torch.manual_seed(5)
    state = getattr(torchvision.models, values["arch"])(weights=None).state_dict()  # with fc.weight, fc.bias
    torch.save(state, tmp_path / "backbone.pth")
    objs = load_train_objs(Config(**values, pretrained=str(tmp_path / "backbone.pth")))
    assert torch.equal(objs.model.backbone.conv1.weight, state["conv1.weight"])
    assert f"pretrained: backbone weights from {tmp_path / 'backbone.pth'}; keys 2 ignored" in capsys.readouterr().out


def test_load_train_objs_builds_a_vit_for_the_crop_and_fits_pretrained_positions(tmp_path, monkeypatch, capsys):
    from torchvision.models.vision_transformer import VisionTransformer

    from arcface import model as model_module

    def tiny_vit(weights=None, image_size=224):  # vit_b_16's class, a fraction of its size
        return VisionTransformer(image_size, 16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)

    monkeypatch.setitem(model_module._BUILDERS, "vit_b_16", tiny_vit)
    torch.save(tiny_vit(image_size=224).state_dict(), tmp_path / "vit.pth")  # torchvision's size
    values = load_toml("configs/smoke.toml") | dict(synthetic_dir=str(tmp_path), arch="vit_b_16", crop=32)
    objs = load_train_objs(Config(**values, pretrained=str(tmp_path / "vit.pth")))
    assert objs.model.backbone.image_size == 32
    assert objs.model.backbone.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 16)
    assert ("keys 2 ignored (classifier, head), 1 interpolated to the crop (ViT position embeddings)"
            in capsys.readouterr().out)


def test_steps_per_epoch_matches_loader_length():
    for n, world, batch, accum in [(64, 1, 8, 1), (65, 2, 4, 1), (7, 2, 3, 1), (100, 3, 7, 2), (63, 2, 4, 1)]:
        lengths = {len(torch.utils.data.DataLoader(range(n), batch_size=batch, drop_last=True,
                                                   sampler=EpochSampler(n, world, r, batch, accum))) for r in range(world)}
        assert lengths == {steps_per_epoch(n, world * batch * accum) * accum}


def _micro_batches(n: int, world: int, accum: int, batch: int, epoch: int = 5, start_step: int = 0) -> list:
    """[step][micro-batch v] -> list of (index, seed), gathered from every rank's sampler."""
    samplers = [EpochSampler(n, world, r, batch, accum, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch, start_step)
    per_rank = [list(s) for s in samplers]
    steps = []
    for step in range(len(per_rank[0]) // (accum * batch)):
        micro = {}
        for r, keys in enumerate(per_rank):
            for a in range(accum):
                start = (step * accum + a) * batch
                micro[a * world + r] = keys[start:start + batch]
        steps.append([micro[v] for v in sorted(micro)])
    return steps


def test_the_micro_batches_of_a_step_do_not_depend_on_how_many_processes_share_them():
    # 2 processes x 1 micro-batch and 1 x 2, at the same global and per-process batch
    reference = _micro_batches(50, world=2, accum=1, batch=4)
    assert _micro_batches(50, world=1, accum=2, batch=4) == reference
    assert len(reference) == 50 // 8 and all(len(step) == 2 for step in reference)
    wide = _micro_batches(50, world=4, accum=1, batch=2)
    assert _micro_batches(50, world=2, accum=2, batch=2) == wide == _micro_batches(50, world=1, accum=4, batch=2)
    # every step's samples are those of the global order, each once in an epoch
    flat = [i for step in reference for micro in step for i, _ in micro]
    assert len(flat) == len(set(flat)) == 48
    # a resume after step 3 on another number of processes continues with step 4
    assert _micro_batches(50, world=1, accum=2, batch=4, start_step=3) == reference[3:]


def test_one_micro_batch_per_step_is_distributed_samplers_sharding():
    ds = MyTrainDataset(40)
    for world in (1, 2):
        for rank in range(world):
            ours = EpochSampler(40, world, rank, batch_size=4, seed=3)
            theirs = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=3)
            ours.set_epoch(2), theirs.set_epoch(2)
            assert [i for i, _ in ours] == list(theirs)[:len(ours)]


def test_sample_seeds_depend_on_seed_epoch_and_index_only():
    one, two = EpochSampler(10, 1, 0, 2, seed=3), EpochSampler(10, 2, 1, 1, seed=3)
    one.set_epoch(5), two.set_epoch(5)
    seeds = dict(one)
    assert all(seeds[i] == s for i, s in two)
    one.set_epoch(6)
    assert dict(one) != seeds



# ---------------------------------------------------------------------------------------
# Single process: resume, crash safety, mismatches


def test_training_learns_and_logs(tmp_path):
    t = toy_trainer(toy_config(tmp_path))
    assert t.train() == 0
    lines = read_lines(tmp_path)
    assert train_epochs(lines) == [1, 2, 3, 4]
    evals = [r for r in lines if "recall@1" in r]
    assert [r["epoch"] for r in evals] == [0, 2, 4]
    assert lines[1]["loss"] > lines[-2]["loss"]
    assert all(k in evals[-1] for k in ("recall@1", "recall@5", "mAP@10"))
    assert (tmp_path / "config.toml").exists() and (tmp_path / "snapshot.pt").exists()


def test_stop_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full = toy_trainer(toy_config(tmp_path / "full"))
    full.train()

    original = Trainer._run_epoch

    def crash_in_third_epoch(self, epoch):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_run_epoch", crash_in_third_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        toy_trainer(toy_config(tmp_path / "resumed")).train()
    assert read_snapshot(tmp_path / "resumed" / "snapshot.pt").epochs_run == 2
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    resumed = toy_trainer(toy_config(tmp_path / "resumed"))
    assert resumed.epochs_run == 2
    resumed.train()

    assert_same_weights(full.raw_model.state_dict(), resumed.raw_model.state_dict())
    a, b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in a:
        torch.testing.assert_close(a[key]["momentum_buffer"], b[key]["momentum_buffer"], rtol=0, atol=0)
    assert train_epochs(read_lines(tmp_path / "resumed")) == [1, 2, 3, 4]
    strip = lambda lines: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in lines]
    assert strip(read_lines(tmp_path / "resumed")) == strip(read_lines(tmp_path / "full"))


def test_signal_stops_mid_epoch_and_resume_is_exact(tmp_path, monkeypatch):
    full = toy_trainer(toy_config(tmp_path / "full"))
    full.train()

    original = Trainer._run_batch
    calls = {"n": 0}

    def signal_on_eleventh_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_run_batch", signal_on_eleventh_batch)
    stopped = toy_trainer(toy_config(tmp_path / "run"))
    assert stopped.train() == 128 + signal.SIGUSR1
    snap = read_snapshot(tmp_path / "run" / "snapshot.pt")
    assert (snap.epochs_run, snap.step_in_epoch) == (1, 3)  # 8 steps per epoch: batch 11 is step 3 of epoch 2
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored after train()
    monkeypatch.setattr(Trainer, "_run_batch", original)
    resumed = toy_trainer(toy_config(tmp_path / "run"))
    assert resumed.train() == 0
    assert_same_weights(full.raw_model.state_dict(), resumed.raw_model.state_dict())
    assert train_epochs(read_lines(tmp_path / "run")) == [1, 2, 3, 4]


def _signal_on_batch(monkeypatch, number: int) -> None:
    original, calls = Trainer._run_batch, {"n": 0}

    def run_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == number:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_run_batch", run_batch)


def test_signal_in_the_last_step_of_an_epoch_completes_that_epoch(tmp_path, monkeypatch, capsys):
    full = toy_trainer(toy_config(tmp_path / "full"))
    full.train()
    _signal_on_batch(monkeypatch, 16)  # 8 steps per epoch: the last step of epoch 2
    stopped = toy_trainer(toy_config(tmp_path / "run"))
    assert stopped.train() == 128 + signal.SIGUSR1
    snap = read_snapshot(tmp_path / "run" / "snapshot.pt")
    assert (snap.epochs_run, snap.step_in_epoch) == (2, 0)
    assert "stopped by SIGUSR1 after epoch 2; snapshot saved" in capsys.readouterr().out
    lines = read_lines(tmp_path / "run")
    assert train_epochs(lines) == [1, 2] and all(np.isfinite(r["lr"]) for r in lines if "lr" in r)
    monkeypatch.undo()
    resumed = toy_trainer(toy_config(tmp_path / "run"))
    assert resumed.train() == 0
    assert_same_weights(full.raw_model.state_dict(), resumed.raw_model.state_dict())
    assert train_epochs(read_lines(tmp_path / "run")) == [1, 2, 3, 4]
    # The evaluation due after epoch 2, skipped by the stop, runs first on resume.
    strip = lambda lines: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in lines]
    assert strip(read_lines(tmp_path / "run")) == strip(read_lines(tmp_path / "full"))


def test_an_evaluation_run_on_resume_is_kept(tmp_path, monkeypatch):
    _signal_on_batch(monkeypatch, 16)  # the end of epoch 2, which is not an evaluation epoch of 4
    assert toy_trainer(toy_config(tmp_path, eval_every=4)).train() == 128 + signal.SIGUSR1
    monkeypatch.undo()
    for _ in range(2):  # a shorter run: epoch 2 is now its last, so its evaluation is due
        assert toy_trainer(toy_config(tmp_path, eval_every=4, total_epochs=2)).train() == 0
    assert [r["epoch"] for r in read_lines(tmp_path) if "recall@1" in r] == [0, 2]
    assert [r["epoch"] for r in read_snapshot(tmp_path / "snapshot.pt").history if "recall@1" in r] == [0, 2]


def test_signal_in_the_very_last_step_finishes_the_run(tmp_path, monkeypatch):
    _signal_on_batch(monkeypatch, 32)
    trainer = toy_trainer(toy_config(tmp_path))
    assert trainer.train() == 0
    lines = read_lines(tmp_path)
    assert train_epochs(lines) == [1, 2, 3, 4] and [r["epoch"] for r in lines if "recall@1" in r] == [0, 2, 4]
    assert read_snapshot(tmp_path / "snapshot.pt").epochs_run == 4


def test_crash_while_writing_snapshot_keeps_the_previous_one(tmp_path, monkeypatch):
    t = toy_trainer(toy_config(tmp_path, total_epochs=2))
    t.train()
    before = read_snapshot(tmp_path / "snapshot.pt")

    def half_written(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        t._save_snapshot()
    after = read_snapshot(tmp_path / "snapshot.pt")
    assert after.epochs_run == before.epochs_run == 2
    assert_same_weights(after.model, before.model)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_snapshot_from_another_model_is_refused(tmp_path):
    toy_trainer(toy_config(tmp_path, total_epochs=1)).train()
    with pytest.raises(SnapshotMismatch, match="arch"):
        toy_trainer(toy_config(tmp_path, total_epochs=1, arch="resnet50"))
    snap = read_snapshot(tmp_path / "snapshot.pt")
    write_snapshot(dataclasses.replace(snap, num_classes=7), tmp_path / "snapshot.pt")
    with pytest.raises(SnapshotMismatch, match="num_classes"):
        toy_trainer(toy_config(tmp_path, total_epochs=1))
    (tmp_path / "snapshot.pt").write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="snapshot.pt: cannot be read as a snapshot") as refused:
        toy_trainer(toy_config(tmp_path, total_epochs=1))
    assert "weights_only" not in str(refused.value)
    torch.save({"format_version": SNAPSHOT_VERSION, "model": {}}, tmp_path / "snapshot.pt")
    with pytest.raises(SnapshotError, match="not a complete snapshot .missing optimizer"):
        toy_trainer(toy_config(tmp_path, total_epochs=1))


def test_resuming_with_fewer_total_epochs_is_refused_before_anything_is_rewritten(tmp_path):
    toy_trainer(toy_config(tmp_path, total_epochs=2)).train()
    config_before = (tmp_path / "config.toml").read_text()
    with pytest.raises(SnapshotMismatch, match="has run 2 epochs, more than total_epochs 1"):
        toy_trainer(toy_config(tmp_path, total_epochs=1))
    assert (tmp_path / "config.toml").read_text() == config_before
    snap = read_snapshot(tmp_path / "snapshot.pt")
    write_snapshot(dataclasses.replace(snap, epochs_run=1, step_in_epoch=snap.steps_per_epoch), tmp_path / "snapshot.pt")
    with pytest.raises(SnapshotError, match=r"field step_in_epoch: expected an integer in \[0, 7\], got 8"):
        toy_trainer(toy_config(tmp_path, total_epochs=2))


def test_non_finite_loss_stops_naming_epoch_and_step(tmp_path, monkeypatch):
    t = toy_trainer(toy_config(tmp_path, total_epochs=3))
    original = t.raw_model.forward
    calls = {"n": 0}

    def poisoned(x, labels=None, step=0):
        out = original(x, labels, step)
        if labels is not None:
            calls["n"] += 1
            if calls["n"] == 13:
                out = out * float("nan")
        return out

    monkeypatch.setattr(t.raw_model, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 2 step 5: .*the last good snapshot "
                                                 r"\(after epoch 1\) is kept"):
        t.train()
    assert read_snapshot(tmp_path / "snapshot.pt").epochs_run == 1  # the last good one


def test_non_finite_embeddings_at_evaluation_stop_as_divergence(tmp_path, monkeypatch):
    # Finite weights can embed to NaN (BatchNorm over all-black images, say): the metrics would
    # otherwise fail with a traceback that names no epoch.
    t = toy_trainer(toy_config(tmp_path, total_epochs=4, eval_every=2))
    original = t.raw_model.embed

    def embed(x):
        out = original(x)
        if not torch.is_grad_enabled() and t.epochs_run >= 2:  # evaluation after epoch 2 (training has gradients)
            out = out.clone()
            out[0, 0] = float("nan")
        return out

    monkeypatch.setattr(t.raw_model, "embed", embed)
    with pytest.raises(FloatingPointError, match=r"^non-finite embeddings at evaluation \(1 of 15 query embeddings "
                                                 r"hold NaN or infinite values\) after epoch 2: training stopped.*last "
                                                 r"good snapshot \(after epoch 1\)"):
        t.train()


def test_divergence_with_a_finite_loss_stops_where_it_arises_and_saves_nothing(tmp_path):
    # ArcFace normalises features and weights, so its loss stays finite while BatchNorm's running
    # statistics run off to infinity; only evaluation would have noticed.
    t = toy_trainer(toy_config(tmp_path, lr=1e6), batch_norm=True)
    with pytest.raises(FloatingPointError, match=r"non-finite BatchNorm statistics \(norm.running_var\) at epoch 1 "
                                                 r"step \d+: .*no snapshot had been saved yet"):
        t.train()
    assert not (tmp_path / "snapshot.pt").exists()


def test_no_snapshot_is_saved_with_non_finite_weights(tmp_path):
    t = toy_trainer(toy_config(tmp_path, total_epochs=2))
    t.train()
    with torch.no_grad():
        t.raw_model.embedding.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite weights \(embedding.weight\) after epoch 2"):
        t._save_snapshot()
    assert torch.isfinite(read_snapshot(tmp_path / "snapshot.pt").model["embedding.weight"]).all()


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    big = toy_trainer(toy_config(tmp_path / "big", batch_size=8, total_epochs=2))
    big.train()
    accum = toy_trainer(toy_config(tmp_path / "accum", batch_size=4, grad_accum_steps=2, total_epochs=2))
    accum.train()
    # same samples per optimizer step, same lr; only float summation order differs
    assert_same_weights(big.raw_model.state_dict(), accum.raw_model.state_dict(), tol=1e-5)


def test_clipping_and_bf16_run_on_cpu(tmp_path):
    t = toy_trainer(toy_config(tmp_path, total_epochs=1, clip_grad_norm=0.01, amp="bf16"))
    assert t.amp_dtype == torch.bfloat16
    before = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    t.train()
    moved = max((t.raw_model.state_dict()[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved


# ---------------------------------------------------------------------------------------
# Two processes


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, batch_size: int) -> None:
    init_gloo(rank, world_size, port)
    try:
        t = toy_trainer(toy_config(out_dir, batch_size=batch_size, total_epochs=2))
        t.train()
        if rank == 0:
            torch.save(t.raw_model.state_dict(), Path(out_dir) / "final.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    spawn(_ddp_worker, args=(2, runtime.free_port(), str(tmp_path / "ddp"), 4), nprocs=2)
    single = toy_trainer(toy_config(tmp_path / "single", batch_size=8, total_epochs=2))
    single.train()
    ddp_state = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    assert_same_weights(single.raw_model.state_dict(), ddp_state, tol=1e-5)
    evals = lambda d: [r for r in read_lines(d) if "recall@1" in r]
    for a, b in zip(evals(tmp_path / "ddp"), evals(tmp_path / "single")):
        assert a["recall@1"] == pytest.approx(b["recall@1"]) and a["mAP@10"] == pytest.approx(b["mAP@10"], abs=1e-4)


def _batch_norm_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, 2, port)
    try:
        t = toy_trainer(toy_config(out_dir, total_epochs=2), batch_norm=True)
        t.train()
        torch.save(dict(t.raw_model.named_buffers()), Path(out_dir) / f"buffers{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_evaluates_with_the_batch_norm_statistics_the_snapshot_keeps(tmp_path):
    # After its last step each rank holds BatchNorm statistics of its own batches; evaluation
    # must not mix them, or the logged metrics differ from those of the saved model.
    spawn(_batch_norm_worker, args=(runtime.free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"buffers{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    model = ToyModel(batch_norm=True)
    model.load_state_dict(read_snapshot(tmp_path / "snapshot.pt").model)
    query_set, gallery_set = toy_eval_sets()
    expected = evaluate_retrieval(model.embed, query_set, gallery_set, batch_size=16, device=torch.device("cpu"),
                                  recall_at=(1, 5), map_at=(10,))
    logged = [r for r in read_lines(tmp_path) if "recall@1" in r][-1]
    metrics = [k for k in expected if "@" in k]
    assert [logged[k] for k in metrics] == pytest.approx([expected[k] for k in metrics])


def _unreadable_snapshot_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, 2, port)
    try:
        toy_trainer(toy_config(out_dir))
        outcome = "started"
    except SnapshotError as refused:
        outcome = str(refused)
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("content, reason", [
    (b"not a snapshot", "cannot be read as a snapshot"),
    ({"format_version": SNAPSHOT_VERSION, "epochs_run": 1, "step_in_epoch": 0}, "not a complete snapshot"),
])
def test_an_unreadable_snapshot_stops_every_rank_instead_of_hanging(tmp_path, content, reason):
    if isinstance(content, bytes):
        (tmp_path / "snapshot.pt").write_bytes(content)
    else:
        torch.save(content, tmp_path / "snapshot.pt")
    context = spawn(_unreadable_snapshot_worker, args=(runtime.free_port(), str(tmp_path)), nprocs=2,
                       join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not stop")
    for rank in (0, 1):
        assert f"snapshot.pt: {reason}" in (tmp_path / f"rank{rank}.txt").read_text(), rank


def test_compile_and_channels_last_run_on_cpu(tmp_path):
    t = toy_trainer(toy_config(tmp_path, total_epochs=1, compile=True, channels_last=True))
    assert t.train() == 0
    assert torch.isfinite(t.raw_model.embedding.weight).all()
    assert not any(k.startswith("_orig_mod") for k in read_snapshot(tmp_path / "snapshot.pt").model)


def test_sync_bn_on_cpu_falls_back_with_a_message(tmp_path, capsys):
    spawn(_sync_bn_worker, args=(runtime.free_port(), str(tmp_path)), nprocs=2)
    assert (tmp_path / "snapshot.pt").exists()


def _sync_bn_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, 2, port)
    try:
        t = toy_trainer(toy_config(out_dir, total_epochs=1, sync_bn=True))
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in t.raw_model.modules())
        t.train()
    finally:
        dist.destroy_process_group()
