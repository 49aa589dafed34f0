"""Partial FC in the Trainer: dense-equal training, dense snapshots, resume at any world size."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from toy import MyTrainDataset, ToyModel, init_gloo, toy_config
import toy

from arcface.partial_fc import PartialFCHead
from datautils import prepare_dataloader
from job import make_optimizer
from support import runtime
from support.schedule import make_schedule
from support.snapshot import read_snapshot
from trainer import Trainer

CLASSES = 7  # divisible by neither 2 nor 3: shards of different sizes


def pfc_trainer(out_dir, **changes) -> Trainer:
    cfg = toy_config(out_dir, **{"batch_size": 4, "global_batch_size": 24, "total_epochs": 3, **changes})
    torch.manual_seed(0)
    model = ToyModel(num_classes=CLASSES, batch_norm=True)
    if cfg.partial_fc:
        model.head = PartialFCHead.from_dense(model.head, cfg.partial_fc, cfg.seed)
    train_set = MyTrainDataset(72, num_classes=CLASSES, seed=1)
    query_set, gallery_set = (MyTrainDataset(n, num_classes=CLASSES, seed=1, split=s) for n, s in ((14, 1), (21, 2)))
    schedule = make_schedule(cfg, len(train_set))
    loader = prepare_dataloader(train_set, schedule, cfg.num_workers, cfg.seed)
    return Trainer(cfg, model, loader, make_optimizer(cfg, model, schedule), schedule, query_set, gallery_set,
                   torch.device("cpu"))


def _worker(rank: int, world_size: int, port: int, out_dir: str, changes: dict) -> None:
    init_gloo(rank, world_size, port)
    try:
        trainer = pfc_trainer(out_dir, **changes)
        assert isinstance(trainer.raw_model.head, PartialFCHead) == bool(changes.get("partial_fc"))
        trainer.train()
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, out_dir: Path, **changes) -> None:
    if world_size == 1:
        pfc_trainer(out_dir, **changes).train()
    else:
        toy.spawn(_worker, args=(world_size, runtime.free_port(), str(out_dir), changes), nprocs=world_size)


def assert_close_states(a: dict, b: dict, tol: float = 1e-4) -> None:
    """Equal up to float rounding (sums in another order), grown over 9 steps at lr 1.5."""
    for key in b:
        if b[key].is_floating_point() and "running" not in key:
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_partial_fc_at_rate_1_trains_like_the_dense_head_and_saves_it_dense(tmp_path, world_size):
    spawn(1, tmp_path / "dense")
    spawn(world_size, tmp_path / "sharded", partial_fc=1.0, clip_grad_norm=5.0)
    spawn(1, tmp_path / "dense_clipped", clip_grad_norm=5.0)
    dense, sharded = (read_snapshot(tmp_path / d / "snapshot.pt") for d in ("dense_clipped", "sharded"))
    assert sharded.model["head.weight"].shape == (CLASSES, 8)  # the dense layout, whatever the sharding
    assert_close_states(sharded.model, dense.model)
    head_index = len(dense.optimizer["state"]) - 1  # the head is the model's last parameter
    torch.testing.assert_close(sharded.optimizer["state"][head_index]["momentum_buffer"],
                               dense.optimizer["state"][head_index]["momentum_buffer"], rtol=1e-4, atol=1e-4)
    # (Later evaluations differ legitimately: BatchNorm's running statistics follow rank 0's
    # micro-batches under DDP and all of them on one process.)
    first_eval = lambda s: next(r for r in s.history if "recall@1" in r)
    assert first_eval(sharded)["mAP@10"] == pytest.approx(first_eval(dense)["mAP@10"])
    unclipped = read_snapshot(tmp_path / "dense" / "snapshot.pt").model
    assert not torch.allclose(unclipped["embedding.weight"], dense.model["embedding.weight"])  # clipping bit


def test_partial_fc_with_adamw_and_a_head_multiple_trains_like_the_dense_head(tmp_path):
    # AdamW keeps two moments per head row: sharded, gathered dense into the snapshot.
    recipe = dict(optimizer="adamw", lr=0.004, weight_decay=0.05, decay_norm_and_bias=False, head_lr_mult=10.0)
    spawn(1, tmp_path / "dense", **recipe)
    spawn(2, tmp_path / "sharded", partial_fc=1.0, **recipe)
    dense, sharded = (read_snapshot(tmp_path / d / "snapshot.pt") for d in ("dense", "sharded"))
    # The bias in front of BatchNorm is left out: the batch mean removes it, so its gradient is 0 but
    # for rounding, which AdamW's normalisation turns into lr-sized steps that differ between runs.
    degenerate = "embedding.bias"
    assert_close_states({k: v for k, v in sharded.model.items() if k != degenerate},
                        {k: v for k, v in dense.model.items() if k != degenerate})
    head_index = len(dense.optimizer["state"]) - 1  # the head is the model's last parameter and group
    assert dense.optimizer["param_groups"][-1]["lr_scale"] == 10.0
    for moment in ("exp_avg", "exp_avg_sq"):
        saved = sharded.optimizer["state"][head_index][moment]
        assert saved.shape == (CLASSES, 8)  # dense, from two shards
        torch.testing.assert_close(saved, dense.optimizer["state"][head_index][moment], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rate", [1.0, pytest.param(0.5, marks=pytest.mark.slow)])
def test_a_snapshot_of_3_processes_resumes_on_2_and_on_1(tmp_path, rate):
    spawn(3, tmp_path / "full", partial_fc=rate)
    for resume_world in (2, 1):
        run = tmp_path / f"resumed_on_{resume_world}"
        toy.spawn(_worker, args=(3, runtime.free_port(), str(run), {"partial_fc": rate, "total_epochs": 1}), nprocs=3)
        assert read_snapshot(run / "snapshot.pt").epochs_run == 1
        spawn(resume_world, run, partial_fc=rate)  # total_epochs 1 -> 3: a resumable change
    full = read_snapshot(tmp_path / "full" / "snapshot.pt").model
    on_2, on_1 = (read_snapshot(tmp_path / f"resumed_on_{w}" / "snapshot.pt").model for w in (2, 1))
    # At r = 1 the math does not depend on the world size (the warm-up spans epoch 1, so the
    # stretched schedule matches too): all three runs agree. At r < 1 the shard boundaries decide
    # which negatives each rank draws, so only the resume itself and the dense layout are checked.
    if rate == 1.0:
        assert_close_states(on_2, on_1)
        assert_close_states(on_2, full)
    assert on_1["head.weight"].shape == full["head.weight"].shape == (CLASSES, 8)


def test_sampling_below_rate_1_is_reproducible_after_a_resume(tmp_path):
    spawn(2, tmp_path / "full", partial_fc=0.5)
    toy.spawn(_worker, args=(2, runtime.free_port(), str(tmp_path / "resumed"), {"partial_fc": 0.5, "total_epochs": 1}),
             nprocs=2)
    spawn(2, tmp_path / "resumed", partial_fc=0.5)  # (the warm-up spans epoch 1: the same lr as "full")
    full, resumed = (read_snapshot(tmp_path / d / "snapshot.pt").model for d in ("full", "resumed"))
    assert_close_states(resumed, full, tol=0.0)  # the same class draws at the same steps
