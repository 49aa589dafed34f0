"""PartialFCHead against the dense ArcFaceHead: sharding, loss, gradients, sampling, re-sharding.

The distributed tests run 2 and 3 gloo processes with class counts divisible by neither (7, 11,
and 2 classes on 3 ranks, where one rank holds none); each worker checks its own shard against
a dense single-process reference it computes itself on the same global batch.
"""

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from toy import MyTrainDataset, init_gloo, spawn

from arcface.head import ArcFaceHead
from arcface.partial_fc import (
    INIT_BLOCK_CLASSES,
    PartialFCHead,
    class_range,
    clip_grad_norm_,
    ddp_ignore_shards,
    gather_dense_state,
    shard_dense,
    shard_dense_state,
)
from support import runtime

IN, DIM, SCALE = 10, 6, 16.0
# Loose enough for another summation order over ranks, tight enough for any real mistake (a
# missing world-size factor, a wrong row, a margin on the wrong class are all > 1e-2).
TOL = dict(rtol=1e-4, atol=1e-5)


def _margins(num_classes: int) -> list[float]:
    return (0.2 + 0.5 * torch.rand(num_classes, generator=torch.Generator().manual_seed(7))).tolist()


def _rows(head: PartialFCHead) -> slice:
    return slice(head.class_start * head.sub_centers, head.class_stop * head.sub_centers)


def _split(n: int, world: int, rank: int) -> slice:
    """Rank's samples of a global batch of n: near-equal, so uneven when world does not divide n."""
    start, stop = class_range(n, world, rank)
    return slice(start, stop)


# ------------------------------------------------------------------------------------------
# Single process: sharding arithmetic, init, the world-size-1 head, sampling, inputs


@pytest.mark.parametrize("num_classes, world", [(7, 2), (7, 3), (11, 3), (2, 3), (1000003, 8)])
def test_class_ranges_are_contiguous_near_equal_and_cover_all_classes(num_classes, world):
    ranges = [class_range(num_classes, world, rank) for rank in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_class_range_errors_and_more_ranks_than_classes():
    assert [class_range(2, 3, rank) for rank in range(3)] == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\)"):
        class_range(7, 3, 3)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        class_range(0, 3, 0)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2])
def test_from_dense_takes_the_dense_heads_rows_and_settings_without_a_draw(world, k):
    dense = ArcFaceHead(DIM, 11, scale=SCALE, margin=_margins(11), sub_centers=k, easy_margin=True)
    for rank in range(world):
        rng_state = torch.get_rng_state()
        head = PartialFCHead.from_dense(dense, sample_rate=0.5, seed=4, rank=rank, world_size=world)
        assert torch.equal(torch.get_rng_state(), rng_state)  # a backbone built next starts equal too
        assert torch.equal(head.weight, dense.weight[_rows(head)])
        assert torch.equal(head.weight, shard_dense(dense.weight, world, rank, k))
        assert torch.equal(head.margin, dense.margin[head.class_start:head.class_stop])
        assert (head.scale, head.easy_margin, head.sample_rate, head.seed) == (SCALE, True, 0.5, 4)
        head.weight.data.add_(1.0)
        assert not torch.equal(head.weight, dense.weight[_rows(head)])  # its own copy


def test_drawn_rows_do_not_depend_on_the_world_size():
    classes, k = 2 * INIT_BLOCK_CLASSES + 5, 2  # three blocks, cut at other places per world size
    rng_state = torch.get_rng_state()
    dense = {world: torch.cat([PartialFCHead(4, classes, sub_centers=k, rank=rank, world_size=world,
                                             seed=5).weight.detach()
                               for rank in range(world)])
             for world in (1, 2, 3)}
    assert torch.equal(torch.get_rng_state(), rng_state)  # leaves the global generator alone
    assert dense[1].shape == (classes * k, 4)
    assert torch.equal(dense[1], dense[2]) and torch.equal(dense[1], dense[3])
    assert 0.009 < dense[1].std().item() < 0.011  # ArcFaceHead's distribution, other numbers
    other_seed = PartialFCHead(4, classes, sub_centers=k, world_size=1, seed=6)
    assert not torch.equal(other_seed.weight.detach(), dense[1])


def test_shard_of_a_rank_without_classes_is_empty():
    head = PartialFCHead(DIM, 2, sub_centers=2, rank=2, world_size=3)
    assert head.weight.shape == (0, DIM) and head.margin.shape == (0,)


@pytest.mark.parametrize("k, easy_margin", [(1, False), (2, True), (3, False)])
def test_one_process_matches_dense_head_and_cross_entropy(k, easy_margin):
    classes, n = 7, 24
    margins = _margins(classes)
    torch.manual_seed(k)
    dense = ArcFaceHead(DIM, classes, SCALE, margins, k, easy_margin)
    head = PartialFCHead.from_dense(dense)
    labels = torch.randint(0, classes, (n,))
    # A third of the samples pointed away from their class: the fallback branch is taken too.
    directions = dense.weight.detach().view(classes, k, DIM)[:, 0]
    features = torch.randn(n, DIM)
    features[: n // 3] = -directions[labels[: n // 3]] + 1e-3 * torch.randn(n // 3, DIM)
    features.requires_grad_(True)
    expected = F.cross_entropy(dense(features, labels), labels)
    loss = head(features, labels)
    torch.testing.assert_close(loss, expected, **TOL)
    # Both heads give the Trainer a batch's loss the same way.
    torch.testing.assert_close(dense.loss(features, labels, step=3), expected, atol=0, rtol=0)
    torch.testing.assert_close(head.loss(features, labels, step=3), loss, atol=0, rtol=0)
    expected_grads = torch.autograd.grad(expected, [features, dense.weight])
    grads = torch.autograd.grad(loss, [features, head.weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert len(head.last_sampled) == classes  # r = 1: every class scored


def test_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    head = PartialFCHead(16, 10, sub_centers=2)
    features, labels = torch.randn(8, 16), torch.randint(0, 10, (8,))
    reference = head(features, labels)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = head(features, labels)
        loss_from_bf16 = head(features.bfloat16(), labels)
    assert loss.dtype == torch.float32 and loss_from_bf16.dtype == torch.float32
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    loss.backward()
    assert head.weight.grad.dtype == torch.float32


def test_int32_labels_are_cast_and_other_labels_refused():
    torch.manual_seed(0)
    head = PartialFCHead(DIM, 5)
    features, labels = torch.randn(6, DIM), torch.tensor([0, 4, 2, 2, 1, 3])
    expected = head(features, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(head(features, labels.to(dtype)), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="labels must be an integer tensor.*float32"):
        head(features, labels.float())
    with pytest.raises(ValueError, match="labels must be an integer tensor.*bool"):
        head(features, labels > 1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got 5"):
        head(features, torch.tensor([0, 5, 1, 1, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got -1"):
        head(features, torch.tensor([0, -1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        head(features, labels[:5])
    with pytest.raises(ValueError, match=r"features must have shape \(N, 6\)"):
        head(features[:, :4], labels)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        PartialFCHead(DIM, 5, sample_rate=0.0)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        PartialFCHead(DIM, 5, sample_rate=1.5)
    with pytest.raises(ValueError, match=r"rows must have shape \(5, 6\) \(this rank's shard\), got \(4, 6\)"):
        PartialFCHead(DIM, 5, rows=torch.zeros(4, DIM))
    with pytest.raises(ValueError, match="got 3 per-class margins, expected 5"):
        PartialFCHead(DIM, 5, margin=[0.1, 0.2, 0.3])
    with pytest.raises(RuntimeError, match="built for world_size 2"):
        PartialFCHead(DIM, 5, rank=0, world_size=2)(torch.randn(3, DIM), torch.tensor([0, 1, 2]))


def test_sampling_keeps_positives_and_is_reproducible_per_seed_step_and_rank():
    classes, rate = 301, 0.1
    labels = torch.randint(0, classes, (12,), generator=torch.Generator().manual_seed(0))

    def sample(rank: int, step: int, seed: int = 0) -> torch.Tensor:
        head = PartialFCHead(DIM, classes, sample_rate=rate, rank=rank, world_size=3, seed=seed)
        local, target = head.sample_classes(labels, step)
        mine = (labels >= head.class_start) & (labels < head.class_stop)
        # Every positive of this shard is scored, and each sample's column points at its class.
        assert set(labels[mine].tolist()) <= set(head.last_sampled.tolist())
        assert torch.equal(head.last_sampled[target[mine]], labels[mine])
        assert (target[~mine] == -1).all()
        assert torch.equal(head.last_sampled, local + head.class_start)
        assert head.last_sampled.tolist() == sorted(set(head.last_sampled.tolist()))
        assert (head.last_sampled >= head.class_start).all() and (head.last_sampled < head.class_stop).all()
        positives = len(set(labels[mine].tolist()))
        assert len(local) == max(math.ceil(rate * head.num_local_classes), positives)
        return head.last_sampled

    for rank in range(3):
        assert torch.equal(sample(rank, 5), sample(rank, 5))  # a resume at step 5 draws the same
        assert not torch.equal(sample(rank, 5), sample(rank, 6))
        assert not torch.equal(sample(rank, 5), sample(rank, 5, seed=1))


def test_sample_rate_one_samples_nothing():
    head = PartialFCHead(DIM, 11, sample_rate=1.0, rank=1, world_size=2)
    local, target = head.sample_classes(torch.tensor([0, 6, 10]), step=3)
    assert torch.equal(local, torch.arange(5)) and target.tolist() == [-1, 0, 4]


# ------------------------------------------------------------------------------------------
# 2 and 3 processes: r = 1 equals the dense head, over SGD steps, with accumulation


class _Net(nn.Module):
    """A linear "backbone" with the head inside, as the Trainer's model is."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.embedding = nn.Linear(IN, DIM)
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        return self.head(self.embedding(x), labels, step)


_CONFIGS = {
    "11 classes": dict(num_classes=11, sub_centers=1, easy_margin=False, per_class=False, batch=12),
    "7 classes, k=2, easy, per-class margins, uneven batch": dict(
        num_classes=7, sub_centers=2, easy_margin=True, per_class=True, batch=10),
    "2 classes, k=2 (3 ranks: one holds none)": dict(
        num_classes=2, sub_centers=2, easy_margin=False, per_class=True, batch=9),
}


def _compare_with_dense(name: str, cfg: dict, accum: int, head_inside_ddp: bool, clip: bool) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    classes, k = cfg["num_classes"], cfg["sub_centers"]
    margin = _margins(classes) if cfg["per_class"] else 0.4
    head_args = (DIM, classes, SCALE, margin, k, cfg["easy_margin"])
    torch.manual_seed(0)
    net = _Net(PartialFCHead.from_dense(ArcFaceHead(*head_args)))
    torch.manual_seed(0)
    reference = _Net(ArcFaceHead(*head_args))  # the same global RNG use: the same start
    assert torch.equal(net.head.weight, reference.head.weight[_rows(net.head)])
    if head_inside_ddp:  # the Trainer's layout: DDP around the whole model, the shard ignored
        assert ddp_ignore_shards(net) == ["head.weight", "head.margin"]
        step_model = DDP(net, gradient_as_bucket_view=True)
        backbone_ddp = step_model
    else:
        backbone_ddp = DDP(net.embedding, gradient_as_bucket_view=True)
        step_model = lambda x, y, step: net.head(backbone_ddp(x), y, step)  # noqa: E731
    optimizer, ref_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
                                for m in (net, reference))
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        for micro in range(accum):
            x, y = torch.randn(cfg["batch"], IN, generator=g), torch.randint(classes, (cfg["batch"],), generator=g)
            mine = _split(cfg["batch"], world, rank)
            sync = micro == accum - 1
            with backbone_ddp.no_sync() if not sync else nullcontext():
                loss = step_model(x[mine], y[mine].int(), step)
                (loss / accum).backward()
            expected = F.cross_entropy(reference.head(reference.embedding(x), y), y)
            (expected / accum).backward()
            torch.testing.assert_close(loss, expected, **TOL, msg=lambda m: f"{name}, step {step} loss: {m}")
        if clip:
            total = clip_grad_norm_(net, max_norm=1.0)
            expected_total = nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
            torch.testing.assert_close(total, expected_total, **TOL)
            assert total > 1.0  # really clipped
        grads = [(n, p.grad) for n, p in net.embedding.named_parameters()] + [("head", net.head.weight.grad)]
        expected_grads = [p.grad for p in reference.embedding.parameters()]
        expected_grads.append(reference.head.weight.grad[_rows(net.head)])
        for (param, got), want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}, step {step} {param} grad: {m}")
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ref_optimizer.zero_grad(set_to_none=True)
    dense = net.head.gather_dense(net.head.weight)
    torch.testing.assert_close(dense, reference.head.weight.detach(), **TOL, msg=lambda m: f"{name} weight: {m}")
    momentum = net.head.gather_dense(optimizer.state[net.head.weight]["momentum_buffer"])
    torch.testing.assert_close(momentum, ref_optimizer.state[reference.head.weight]["momentum_buffer"], **TOL)
    for param, want in zip(net.embedding.parameters(), reference.embedding.parameters()):
        torch.testing.assert_close(param, want, **TOL, msg=lambda m: f"{name} backbone: {m}")


def _dense_equivalence_worker(rank: int, world: int, port: int) -> None:
    init_gloo(rank, world, port)
    try:
        for index, (name, cfg) in enumerate(_CONFIGS.items()):
            _compare_with_dense(name, cfg, accum=1, head_inside_ddp=False, clip=index == 0)
            _compare_with_dense(name + ", 2 micro-batches", cfg, accum=2, head_inside_ddp=True, clip=False)
        _bad_inputs_raise_on_every_rank(rank)
    finally:
        dist.destroy_process_group()


def _bad_inputs_raise_on_every_rank(rank: int) -> None:
    """One rank's bad input makes every rank raise (no rank left waiting in a collective)."""
    head = PartialFCHead(DIM, 11)
    features, labels = torch.randn(4, DIM), torch.randint(11, (4,))
    bad_labels = labels.float() if rank == 1 else labels
    with pytest.raises(ValueError, match="labels must be an integer tensor" if rank == 1 else
                       "rank 1's inputs are invalid"):
        head(features, bad_labels)
    out_of_range = torch.full_like(labels, 11) if rank == 0 else labels
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\), got 11"):
        head(features, out_of_range)
    head(features, labels)  # and the group still works


@pytest.mark.parametrize("world", [2, 3])
def test_sample_rate_one_equals_dense_loss_gradients_and_sgd_steps(world):
    spawn(_dense_equivalence_worker, args=(world, runtime.free_port()), nprocs=world)


# ------------------------------------------------------------------------------------------
# r < 1 on 2 processes


def _sampled_worker(rank: int, port: int) -> None:
    init_gloo(rank, 2, port)
    try:
        classes, k, rate, per_rank = 203, 2, 0.3, 16
        torch.manual_seed(0)
        embedding = nn.Linear(20, 16)
        head = PartialFCHead(16, classes, scale=16.0, margin=0.2, sub_centers=k, sample_rate=rate)
        initial = head.gather_dense(head.weight)
        twin = PartialFCHead(16, classes, scale=16.0, margin=0.2, sub_centers=k, sample_rate=rate)
        model = DDP(embedding)
        optimizer = torch.optim.SGD([*embedding.parameters(), head.weight], lr=0.2, momentum=0.9,
                                    weight_decay=5e-4)
        data = MyTrainDataset(40 * 2 * per_rank, in_features=20, num_classes=classes, seed=3)
        losses = []
        for step in range(40):
            batch = slice((2 * step + rank) * per_rank, (2 * step + rank + 1) * per_rank)
            x, y = data.data[batch], data.labels[batch]
            loss = head(model(x), y.int() if step % 2 else y, step)
            parts = [torch.empty_like(y) for _ in range(2)]
            dist.all_gather(parts, y)
            all_labels = torch.cat(parts)
            sampled = head.last_sampled
            mine = (all_labels >= head.class_start) & (all_labels < head.class_stop)
            assert set(all_labels[mine].tolist()) <= set(sampled.tolist())  # positives kept
            assert len(sampled) < head.num_local_classes  # really sampled
            twin.sample_classes(all_labels, step)
            assert torch.equal(twin.last_sampled, sampled)  # same (seed, step, rank): same draw
            twin.sample_classes(all_labels, step + 1)
            assert not torch.equal(twin.last_sampled, sampled)
            if step == 0:
                _check_sampled_loss_is_dense_loss_over_sampled_classes(
                    loss, embedding(x).detach(), y, sampled, initial, classes, k)
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        every_rank = [None, None]
        dist.all_gather_object(every_rank, losses)
        assert every_rank[0] == every_rank[1]  # bitwise the same loss on every rank
        assert all(math.isfinite(v) for v in losses)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.5 * first, (first, last)
    finally:
        dist.destroy_process_group()


def _check_sampled_loss_is_dense_loss_over_sampled_classes(loss, features, labels, sampled,
                                                           dense_weight, classes, k) -> None:
    """The sampled loss = cross-entropy of the dense head's logits restricted to the union of
    every rank's sampled classes."""
    feats = [torch.empty_like(features) for _ in range(2)]
    dist.all_gather(feats, features)
    labs = [torch.empty_like(labels) for _ in range(2)]
    dist.all_gather(labs, labels)
    union = [None, None]
    dist.all_gather_object(union, sampled.tolist())
    columns = torch.tensor(union[0] + union[1])
    dense = ArcFaceHead(16, classes, scale=16.0, margin=0.2, sub_centers=k)
    with torch.no_grad():
        dense.weight.copy_(dense_weight)
    all_labels = torch.cat(labs)
    logits = dense(torch.cat(feats), all_labels)[:, columns]
    target = (columns[None, :] == all_labels[:, None]).int().argmax(1)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, target), **TOL)


def test_sampled_training_keeps_positives_reproduces_draws_and_learns():
    spawn(_sampled_worker, args=(runtime.free_port(),), nprocs=2)


# ------------------------------------------------------------------------------------------
# Dense snapshots: written under 3 processes, re-sharded onto 2 and 1


_RESHARD = dict(in_features=DIM, num_classes=11, scale=SCALE, margin=0.3, sub_centers=2)


def _train_steps(head: PartialFCHead, optimizer, steps: range, rank: int, world: int) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(12, DIM, generator=g), torch.randint(11, (12,), generator=g)
        mine = _split(12, world, rank)
        head(x[mine], y[mine], step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _write_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, 3, port)
    try:
        head = PartialFCHead(**_RESHARD, sample_rate=0.5)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        _train_steps(head, optimizer, range(2), rank, 3)
        dense = head.gather_dense(head.weight)
        model_state, optimizer_state = gather_dense_state(head, optimizer, dst=0)
        assert torch.equal(head.local_rows(dense), head.weight)
        if rank == 0:
            assert torch.equal(model_state["weight"], dense)
            assert optimizer_state["state"][0]["momentum_buffer"].shape == dense.shape
            torch.save({"model": model_state, "optimizer": optimizer_state}, Path(out_dir) / "dense.pt")
    finally:
        dist.destroy_process_group()


def _reshard_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, 2, port)
    try:
        saved = torch.load(Path(out_dir) / "dense.pt", weights_only=True)
        head = PartialFCHead(**_RESHARD)  # other values, then loaded
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        _load_dense(head, optimizer, saved)
        weight, saved_momentum = saved["model"]["weight"], saved["optimizer"]["state"][0]["momentum_buffer"]
        assert torch.equal(head.weight, shard_dense(weight, 2, rank, 2))
        momentum = optimizer.state[head.weight]["momentum_buffer"]
        assert torch.equal(momentum, shard_dense(saved_momentum, 2, rank, 2))
        assert torch.equal(head.gather_dense(head.weight), weight)  # exactly
        assert torch.equal(head.gather_dense(momentum), saved_momentum)
        head.sample_rate = 1.0  # exact: the next step must not depend on the world size
        _train_steps(head, optimizer, range(2, 3), rank, 2)
        after = head.gather_dense(head.weight, dst=0)
        if rank == 0:
            torch.save(after, Path(out_dir) / "after_2.pt")
    finally:
        dist.destroy_process_group()


def test_dense_snapshot_from_3_processes_reshards_onto_2_and_1(tmp_path):
    spawn(_write_worker, args=(runtime.free_port(), str(tmp_path)), nprocs=3)
    spawn(_reshard_worker, args=(runtime.free_port(), str(tmp_path)), nprocs=2)
    saved = torch.load(tmp_path / "dense.pt", weights_only=True)
    head = PartialFCHead(**_RESHARD)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _load_dense(head, optimizer, saved)
    assert torch.equal(head.weight, saved["model"]["weight"])
    assert torch.equal(head.gather_dense(head.weight), saved["model"]["weight"])
    _train_steps(head, optimizer, range(2, 3), 0, 1)
    # Weight and momentum re-sharded correctly: the same next step on 1 as on 2 processes.
    torch.testing.assert_close(head.weight.detach(), torch.load(tmp_path / "after_2.pt"), **TOL)
    dense = ArcFaceHead(DIM, 11, sub_centers=2)  # the dense head loads it as it is
    dense.load_state_dict(saved["model"])
    with pytest.raises(ValueError, match=r"expected 22 dense rows, got \(20, 6\)"):
        shard_dense_state(head, optimizer, {"weight": saved["model"]["weight"][:20]}, saved["optimizer"])


def _load_dense(head: PartialFCHead, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    model_state, optimizer_state = shard_dense_state(head, optimizer, saved["model"], saved["optimizer"])
    head.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


# ------------------------------------------------------------------------------------------
# bench/bench_partial_fc.py at toy sizes


def test_bench_runs_at_toy_sizes_and_guards_ram(capsys):
    from bench import bench_partial_fc

    threads = torch.get_num_threads()
    try:
        result = bench_partial_fc.main(["--classes", "3001", "--dim", "16", "--batch", "8", "--steps", "1",
                                        "--modes", "dense", "pfc1", "pfc0.5"])
        skipped = bench_partial_fc.main(["--classes", "3001", "--ram_fraction", "1e-9"])
        toy = bench_partial_fc._toy_run(0.1, True, 0, classes=40, dim=8, steps=2, batch=8)  # frozen rows
    finally:
        torch.set_num_threads(threads)
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == {"dense", "pfc1", "pfc0.5"}
    for mode in ("pfc1", "pfc0.5"):  # each process: half the dense head, plus the gathered batch
        assert 1.0 <= rows[mode]["state_vs_dense_over_world"] < 1.01
        assert rows[mode]["step_s"] > 0 and rows[mode]["peak_gib"] > 0
    assert all("skipped" in row for row in skipped["rows"])
    assert math.isfinite(toy["loss"]) and 0 <= toy["top1"] <= 1
    assert '"bench": "partial_fc"' in capsys.readouterr().out
