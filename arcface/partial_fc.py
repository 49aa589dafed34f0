"""Partial FC: the ArcFace head sharded over processes by class, with optional class sampling.

The ideas of insightface's Partial FC (An et al., "Partial FC: Training 10 Million Identities on
a Single Machine", 2021, and "Killing Two Birds with One Stone: Efficient and Robust Training of
Face Recognition CNNs by Partial FC", CVPR 2022), written anew for this project:

- Model parallel head. Rank r holds only the classes `class_range(num_classes, world, r)`: a
  contiguous, near-equal range, all sub-centers of a class on the same rank, so its `weight` is
  rows `[start * k, stop * k)` of the dense `ArcFaceHead.weight` (row `c * k + j` is sub-center
  j of class c). Weight, gradient and optimizer state per process shrink by the world size.
- Data parallel features. `forward` all-gathers the embeddings and labels of the global batch,
  computes margin logits against the local shard only, and a distributed softmax cross-entropy
  (row max and sum of exp all-reduced): each process holds logits (global batch, local classes)
  instead of (local batch, all classes), and no process ever holds the full head.
- Class sampling (sample_rate r < 1). Per step, a rank scores only the classes of the global
  batch that fall in its shard (the positives, always kept) plus a random ceil(r * local)
  subset of the others. The draw comes from a torch.Generator seeded from (seed, step, rank), so
  a resumed run samples the same classes at the same step. r = 1 samples nothing: exact.

Loss and gradient scaling (with DDP around the backbone, not around this head)
    `forward` returns the mean cross-entropy over the GLOBAL batch, the same value on every rank.
    The head's weight gradient is exactly d(global mean)/d(shard rows): the head is not
    averaged by DDP, so nothing else is needed. The embeddings' gradient is world_size x
    d(global mean)/d(own embeddings): DDP then AVERAGES the backbone gradients over ranks, and
    (1/world) * sum over ranks of world * d(mean)/d(theta through rank r's samples) is exactly
    the gradient a single process gets from the whole global batch. So train exactly as with a
    dense head: `(loss / grad_accum_steps).backward()`, DDP's `no_sync()` on all but the last
    micro-batch; each micro-batch is one global mean, and dividing by the number of
    micro-batches averages them (equal micro-batches: the mean over the whole step's samples).
    Without DDP (backbone gradients summed by hand), divide them by the world size instead.
    If the head sits inside the module DDP wraps, call `ddp_ignore_partial_fc(model)` before
    building DDP: DDP must neither all-reduce nor broadcast the shard (each rank's is different).

Initialisation
    `PartialFCHead.from_dense(head)` takes its rows from a dense ArcFaceHead: the job builds the
    dense head first, so a sharded run starts where the dense one does (same seed, same weights).
    That costs one dense float32 weight of host memory per process, briefly: 2 GiB at 1M classes
    x 512-d, 20 GiB at 10M (and all processes of a node draw at the same time). The constructor
    never materialises it: class blocks of `INIT_BLOCK_CLASSES` classes are drawn from generators
    seeded by (seed, block), so the weight does not depend on the world size either, and it
    leaves the global RNG alone; its values differ from a dense ArcFaceHead's (same
    distribution, other numbers).

Unsampled rows at r < 1 (decision: plain SGD touches them, as insightface's partial_fc_v2)
    Their gradient is zero and the optimizer sees the whole shard, so weight decay still shrinks
    them and their momentum keeps moving them (decaying). The alternative, freezing them (no
    update, momentum kept until sampled again; insightface's first Partial FC did that by
    writing the sampled rows and their momentum back), measured on one process (`python
    bench/bench_partial_fc.py --study unsampled`: 2000 classes, 64-d Gaussian clusters through
    a linear layer, SGD lr 0.1 momentum 0.9 weight decay 5e-4, batch 128; held-out full-softmax
    loss / top-1, mean of 3 seeds; seed-to-seed spread at most 0.15 in loss, 0.01 in top-1):
                                   dense r = 1     r = 0.1 SGD     r = 0.1 frozen
        separated, 300 steps       0.64 / 0.999    2.22 / 0.984    1.97 / 0.989
        overlapping, 900 steps     8.48 / 0.705    9.23 / 0.633   10.27 / 0.539
    Freezing is slightly better on the easy problem (0.25 in loss, 0.5 points of top-1), plain
    SGD much better on the hard one (1.0 in loss, 9 points of top-1). A reason: with
    momentum, a gradient moves a row over the next ~1 / (1 - momentum) steps, as in dense
    training; frozen, only on the steps that sample the row, about 1 / r times later. Plain SGD
    also needs no optimizer changes (freezing needs a custom step, or copies of the unsampled
    rows every step), keeps every row's norm on the dense weight-decay schedule, and at r = 1
    it is the dense update.

More processes than classes
    Allowed: a rank may hold 0 classes (a (0, d) weight). It still takes part in every
    collective and returns the same loss; its gradient is empty.

Snapshots
    `gather_dense_state` and `shard_dense_state` are the pair that turns a model's and its
    optimizer's state into the dense layout and back, for any model (a dense head passes
    through). Gathering holds the whole dense tensor on the receiving rank, on the shard's
    device: num_classes * k * d * 4 bytes (2 GiB per tensor at 1M x 512; weight + momentum =
    4 GiB) plus the shard. For heads too large for one process, each rank would save only its
    shard with its class range (torch.distributed.checkpoint, which writes shards in parallel and
    re-shards on load, or one file per rank plus (num_classes, k, world) in a manifest) and load
    by reading only the rows of its new range (torch.load(mmap=True) and slicing).

For the Trainer
    It calls the same helpers whatever the head: `ddp_ignore_shards(model)` before DDP,
    `model(images, labels, step)` for the loss (both heads' `loss`), `clip_grad_norm_(model, max)`
    (the shards' squared norms are added over ranks, or each rank would clip its replicated
    backbone by another factor and the replicas would drift apart), and the state pair above.
    A GradScaler decides on each rank alone whether to skip a step; its ranks must agree
    (all-reduce found_inf) if a shard's gradient can be non-finite while another's is not (the
    configuration refuses fp16 with Partial FC). Each step costs three small host
    synchronisations (batch sizes, the label check, the number of positives) and five
    collectives in forward (sizes, features, labels, row max, sums) plus one in backward (the
    embedding gradients).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from arcface.head import ArcFaceHead, check_head_args, load_margins
from support import runtime

# Classes per independently seeded block of the drawn rows: large enough that generator set-up
# is negligible, small enough that a block is a small buffer (4096 x 512 floats = 8 MiB).
INIT_BLOCK_CLASSES = 4096

_MASK64 = (1 << 64) - 1
_SAMPLE_SALT = 0x5A17  # keep the sampling and the init streams apart for the same seed
_INIT_SALT = 0x1417


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank's classes [start, stop): contiguous, sizes differ by at most 1, lower ranks larger.

    With world_size > num_classes the last ranks get empty ranges (start == stop).
    """
    for name, value, low in (("num_classes", num_classes, 1), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"class_range: {name} must be a positive integer, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"class_range: rank must be in [0, {world_size}), got {rank!r}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_dense(dense: torch.Tensor, world_size: int, rank: int, sub_centers: int = 1) -> torch.Tensor:
    """The rows of `rank`'s classes in a dense (num_classes * sub_centers, ...) tensor (a view)."""
    if dense.ndim < 1 or dense.shape[0] % sub_centers:
        raise ValueError(f"shard_dense: {tuple(dense.shape)} has no whole number of classes of "
                         f"{sub_centers} sub-centers")
    start, stop = class_range(dense.shape[0] // sub_centers, world_size, rank)
    return dense[start * sub_centers:stop * sub_centers]


def ddp_ignore_shards(model: nn.Module) -> list[str]:
    """Makes a DDP built on `model` later leave every PartialFCHead inside it alone (a model with
    a dense head: nothing). Returns the ignored names.

    Each rank's shard differs, so DDP must neither broadcast it at construction, nor all-reduce
    its gradient, nor broadcast its margin buffer in forward.
    """
    names = []
    for prefix, module in _shards(model):
        dot = f"{prefix}." if prefix else ""
        names += [dot + name for name, _ in module.named_parameters()]
        names += [dot + name for name, _ in module.named_buffers()]
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_ of the model's parameters; with a sharded head, over the whole
    model of every rank: the shards' squared norms are added over ranks, so every rank clips by
    the same factor. Returns the total norm."""
    sharded_ids = {id(p) for _, head in _shards(model) for p in head.parameters()}
    if not sharded_ids:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    replicated = [p.grad for p in model.parameters() if id(p) not in sharded_ids and p.grad is not None]
    sharded = [p.grad for p in model.parameters() if id(p) in sharded_ids and p.grad is not None]
    device = (replicated or sharded)[0].device if replicated or sharded else torch.device("cpu")
    squares = torch.zeros(2, device=device)
    for index, grads in enumerate((replicated, sharded)):
        for grad in grads:
            squares[index] += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
    if runtime.is_distributed():
        shard_squares = squares[1:].clone()
        dist.all_reduce(shard_squares)
        squares[1:] = shard_squares
    total = squares.sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as nn.utils.clip_grad_norm_
    for grad in replicated + sharded:
        grad.mul_(coef.to(grad.dtype))
    return total


def gather_dense_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                       dst: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state dicts in the dense layout: every PartialFCHead's weight
    and weight-shaped optimizer state (momentum) gathered from all ranks onto rank `dst` (a
    collective; the other ranks' dicts keep their shard). A dense model's state as it is."""
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    for prefix, head in _shards(model):
        weight = head.gather_dense(head.weight, dst)
        state = optimizer.state.get(head.weight, {})
        gathered = {name: head.gather_dense(value, dst) if _is_row_state(value, head.weight) else value
                    for name, value in sorted(state.items())}
        if head.rank == dst:
            model_state[_weight_key(prefix)] = weight
            if gathered:
                optimizer_state["state"][_param_index(optimizer, head.weight)] = gathered
    return model_state, optimizer_state


def shard_dense_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                      optimizer_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`gather_dense_state`'s inverse: dense state dicts (of any world size) cut to this rank's
    shards, ready for load_state_dict. A dense model's state as it is."""
    for prefix, head in _shards(model):
        key = _weight_key(prefix)
        model_state = {**model_state, key: head.local_rows(model_state[key])}
        index = _param_index(optimizer, head.weight)
        saved = optimizer_state["state"].get(index)
        if saved:
            rows = head.num_classes * head.sub_centers
            local = {k: head.local_rows(v) if torch.is_tensor(v) and v.ndim == 2 and v.shape[0] == rows else v
                     for k, v in saved.items()}
            optimizer_state = {**optimizer_state, "state": {**optimizer_state["state"], index: local}}
    return model_state, optimizer_state


def _shards(model: nn.Module) -> list[tuple[str, PartialFCHead]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, PartialFCHead)]


def _weight_key(prefix: str) -> str:
    return f"{prefix}.weight" if prefix else "weight"


def _param_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """`param`'s key in optimizer.state_dict()["state"]."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)


class PartialFCHead(nn.Module):
    """This rank's shard of an ArcFaceHead; `forward(features, labels, step)` returns the global loss.

    Arguments as ArcFaceHead, plus:
      sample_rate: r in (0, 1]; r < 1 scores only the batch's classes and a random
        ceil(r * local classes) of the others per step (see the module docstring).
      rank, world_size: default from the default process group (0 and 1 without one). A head
        can be built for any rank without a process group (to inspect or re-shard); forward
        then needs the process group when world_size > 1.
      seed: seeds the class sampling (mixed with step and rank) and the rows' draw.
      rows: this rank's rows of the weight; None draws them per class block (module docstring).
        `from_dense` passes them.

    `weight` is (local_classes * sub_centers, in_features), rows `[start * k, stop * k)` of the
    dense layout; `margin` (non-persistent buffer) holds the margins of the local classes.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float | Sequence[float] | str | os.PathLike = 0.5,
        sub_centers: int = 1,
        easy_margin: bool = False,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_head_args("PartialFCHead", in_features, num_classes, sub_centers, scale)
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"PartialFCHead: sample_rate must be in (0, 1], got {sample_rate!r}")
        self.world_size = world_size if world_size is not None else runtime.world_size()
        self.rank = rank if rank is not None else runtime.global_rank()
        self.class_start, self.class_stop = class_range(num_classes, self.world_size, self.rank)
        self.in_features = in_features
        self.num_classes = num_classes
        self.sub_centers = sub_centers
        self.scale = float(scale)
        self.easy_margin = easy_margin
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        # Global ids of the classes the last forward scored (all local ones at r = 1).
        self.last_sampled: torch.Tensor | None = None
        expected = (self.num_local_classes * sub_centers, in_features)
        if rows is not None and tuple(rows.shape) != expected:
            raise ValueError(f"PartialFCHead: rows must have shape {expected} (this rank's shard), "
                             f"got {tuple(rows.shape)}")
        self.weight = nn.Parameter(self._drawn_rows() if rows is None else rows)
        margins = load_margins(margin, num_classes)[self.class_start:self.class_stop]
        self.register_buffer("margin", margins.clone(), persistent=False)

    @classmethod
    def from_dense(cls, head: ArcFaceHead, sample_rate: float = 1.0, seed: int = 0,
                   rank: int | None = None, world_size: int | None = None) -> PartialFCHead:
        """This rank's shard of `head`: its rows, margins and settings, so that a sharded run
        starts where the dense one does."""
        world = world_size if world_size is not None else runtime.world_size()
        rank = rank if rank is not None else runtime.global_rank()
        rows = shard_dense(head.weight.detach(), world, rank, head.sub_centers).clone()
        return cls(head.in_features, head.num_classes, head.scale, head.margin.tolist(), head.sub_centers,
                   head.easy_margin, sample_rate=sample_rate, rank=rank, world_size=world, seed=seed, rows=rows)

    @property
    def num_local_classes(self) -> int:
        return self.class_stop - self.class_start

    def _drawn_rows(self) -> torch.Tensor:
        """Normal(0, 0.01) rows drawn per class block: independent of the world size."""
        k, parts = self.sub_centers, []
        first_block = self.class_start // INIT_BLOCK_CLASSES
        for block in range(first_block, -(-self.class_stop // INIT_BLOCK_CLASSES)):
            block_start = block * INIT_BLOCK_CLASSES
            block_stop = min(block_start + INIT_BLOCK_CLASSES, self.num_classes)
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, _INIT_SALT, block))
            rows = torch.empty((block_stop - block_start) * k, self.in_features)
            rows.normal_(0.0, 0.01, generator=generator)
            lo = max(self.class_start, block_start) - block_start
            hi = min(self.class_stop, block_stop) - block_start
            parts.append(rows[lo * k:hi * k])
        return torch.cat(parts) if parts else torch.empty(0, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_stop}), rank={self.rank}, "
            f"world_size={self.world_size}, scale={self.scale:g}, sub_centers={self.sub_centers}, "
            f"easy_margin={self.easy_margin}, sample_rate={self.sample_rate:g}"
        )

    # ------------------------------------------------------------------------------------
    # Training

    def loss(self, features: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The batch's loss, as ArcFaceHead.loss: this head's forward."""
        return self(features, labels, step)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """(N_local, d) features, (N_local,) integer labels of THIS rank -> scalar float32 loss.

        The loss is the mean ArcFace cross-entropy over the global batch (all ranks' samples),
        the same on every rank; every rank must call forward (collectives). `step` selects the
        class sample at r < 1: pass the optimizer step, so that
        a resumed run draws the same classes (the micro-batches of one step may share it: the
        same random scores, each with its own positives). Gradient scaling: module docstring.
        """
        problem = _input_problem(features, labels, self.in_features)
        labels = labels.long() if problem is None else labels
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"PartialFCHead: step must be an int, got {step!r}")
        # As ArcFaceHead, float32 even under autocast (bfloat16 cannot resolve small angles).
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float() if problem is None else features
            all_features, all_labels = self._gather(features, labels, problem)  # (N, d), (N,)
            bad = (all_labels < 0) | (all_labels >= self.num_classes)
            if bad.any():  # the same gathered labels on every rank: all raise together
                raise ValueError(f"PartialFCHead: labels must be in [0, {self.num_classes}), got "
                                 f"{all_labels[bad][0].item()} in the global batch")
            classes, target = self.sample_classes(all_labels, step)  # (S,), (N,)
            logits = self._margin_logits(all_features, classes, target)  # (N, S)
            return _ShardedCrossEntropy.apply(logits, target, self.world_size > 1)

    def _gather(self, features: torch.Tensor, labels: torch.Tensor,
                problem: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (n, d) and (n,) -> the global batch's (N, d) and (N,), in rank order."""
        if self.world_size == 1:
            if problem is not None:
                raise ValueError(f"PartialFCHead: {problem}")
            return features, labels
        if runtime.world_size() != self.world_size:
            raise RuntimeError(f"PartialFCHead: built for world_size {self.world_size}, forward needs "
                               "a process group of that size")
        # Sizes and input checks travel together, so one bad rank makes every rank raise
        # instead of leaving the others waiting in the next collective.
        local = torch.tensor([len(features) if problem is None else 0, problem is not None],
                             device=features.device)
        sizes = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(sizes, local)
        sizes, failed = zip(*(s.tolist() for s in sizes))
        if any(failed):
            bad_rank = failed.index(1)
            where = problem if bad_rank == self.rank else f"rank {bad_rank}'s inputs are invalid (see its error)"
            raise ValueError(f"PartialFCHead: {where}")
        all_features = _GatherFeatures.apply(features, list(sizes), self.rank)
        all_labels = _all_gather_rows(labels, list(sizes))
        return all_features, all_labels

    def sample_classes(self, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global batch labels (N,) -> (the local class indices scored (S,), sorted; each sample's
        column among them, or -1 where its class is on another rank (N,)).

        At r < 1: the batch's classes in this shard, plus the highest of ceil(r * local) random
        scores drawn from a generator seeded by (seed, step, rank) -- drawn before the
        positives are known, so the same (seed, step, rank) always draws the same scores.
        Also sets `last_sampled` (global class ids).
        """
        local_count = self.num_local_classes
        local = labels - self.class_start  # (N,) local class index where in the shard
        in_shard = (local >= 0) & (local < local_count)
        positives = torch.unique(local[in_shard])  # sorted
        num_sample = max(math.ceil(self.sample_rate * local_count), len(positives))
        if num_sample >= local_count:  # r = 1 (or the batch covers the shard): exact
            classes = torch.arange(local_count, device=labels.device)
            target = torch.where(in_shard, local, -1)
        else:
            generator = torch.Generator(device=self.weight.device)
            generator.manual_seed(_mix_seed(self.seed, _SAMPLE_SALT, step, self.rank))
            score = torch.rand(local_count, generator=generator, device=self.weight.device)
            score[positives] = 2.0  # above every random score: always kept
            classes = score.topk(num_sample, sorted=False).indices.sort().values  # (S,)
            column = torch.full((local_count,), -1, dtype=torch.long, device=labels.device)
            column[classes] = torch.arange(num_sample, device=labels.device)
            target = torch.where(in_shard, column[local.clamp(0, max(local_count - 1, 0))], -1)
        self.last_sampled = classes + self.class_start
        return classes, target

    def _margin_logits(self, features: torch.Tensor, classes: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
        """(N, d) features, (S,) local classes, (N,) columns -> (N, S) float32 margin logits."""
        n, s, k, d = len(features), len(classes), self.sub_centers, self.in_features
        if s == self.num_local_classes:
            weight = self.weight  # (S*k, d)
        else:
            # The gradient of the unsampled rows is zero (see the module docstring).
            weight = self.weight.view(-1, k, d).index_select(0, classes).view(s * k, d)  # (S*k, d)
        x = F.normalize(features, dim=1)  # (N, d)
        cos = _RowNormalisedProduct.apply(x, weight).clamp(-1.0, 1.0)  # (N, S*k)
        cos = cos.view(n, s) if k == 1 else cos.view(n, s, k).amax(dim=2)  # (N, S)
        rows = (target >= 0).nonzero().squeeze(1)  # (P,) samples whose class is here
        cols = target[rows]  # (P,)
        # The dense head's margin function (it reads only easy_margin), so both stay one formula.
        phi = ArcFaceHead._add_margin(self, cos[rows, cols], self.margin[classes[cols]])  # (P,)
        logits = self.scale * cos  # (N, S); nothing saves it for backward, so edit in place
        return logits.index_put_((rows, cols), self.scale * phi)

    # ------------------------------------------------------------------------------------
    # Dense layout (snapshots)

    def gather_dense(self, tensor: torch.Tensor, dst: int | None = None) -> torch.Tensor | None:
        """This rank's (local_classes * k, ...) rows -> the dense (num_classes * k, ...) tensor.

        On every rank (dst None) or only on rank `dst` (the others return None); every rank
        must call it. Works for the weight and for same-shaped optimizer state.
        """
        k = self.sub_centers
        if tensor.shape[0] != self.num_local_classes * k:
            raise ValueError(f"gather_dense: expected {self.num_local_classes * k} rows (this "
                             f"rank's shard), got {tuple(tensor.shape)}")
        tensor = tensor.detach()
        if self.world_size == 1:
            return tensor.clone()
        receives = dst is None or dst == self.rank
        dense = tensor.new_empty((self.num_classes * k, *tensor.shape[1:])) if receives else None
        for source in range(self.world_size):
            start, stop = (c * k for c in class_range(self.num_classes, self.world_size, source))
            if start == stop:
                continue
            if dst is None:  # one broadcast per shard, straight into the dense rows (no padding)
                rows = dense[start:stop]
                if source == self.rank:
                    rows.copy_(tensor)
                dist.broadcast(rows, src=source)
            elif source == self.rank and source == dst:
                dense[start:stop].copy_(tensor)
            elif source == self.rank:
                dist.send(tensor.contiguous(), dst=dst)
            elif self.rank == dst:
                dist.recv(dense[start:stop], src=source)
        return dense

    def local_rows(self, dense: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a dense (num_classes * k, ...) tensor (a view)."""
        if dense.shape[0] != self.num_classes * self.sub_centers:
            raise ValueError(f"expected {self.num_classes * self.sub_centers} dense rows, got "
                             f"{tuple(dense.shape)}")
        return shard_dense(dense, self.world_size, self.rank, self.sub_centers)


class _GatherFeatures(torch.autograd.Function):
    """All-gather (n_r, d) embeddings into the global (N, d); backward returns each rank its rows."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_rows(features, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank's grad holds only its shard's contribution to d(global mean)/d(all
        # embeddings); summing over ranks gives the full gradient of this rank's rows. The
        # factor world_size is deliberate: DDP divides the backbone gradients by world_size
        # when it averages them, and this factor cancels that division, so the backbone ends
        # with exactly d(global mean loss)/d(theta), the single-process gradient of the
        # global batch. (Without DDP, i.e. summing backbone gradients by hand: divide by it.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None


class _RowNormalisedProduct(torch.autograd.Function):
    """(N, d) x, (R, d) w -> (N, R) x . w / |w|: cosines for unit rows x, without normalising w.

    ArcFaceHead computes x @ normalize(w).T, which holds a normalised copy of the weight and,
    in backward, its gradient and the normalisation's temporaries: several (R, d) tensors. Here
    only (N, R) tensors are made besides the weight's gradient itself; with d > N (512 > a global
    batch of 128) that is the smaller side. The same function: equal up to float rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        inv_norm = 1.0 / weight.norm(dim=1).clamp_min(1e-12)  # (R,) F.normalize's eps
        out = (x @ weight.T).mul_(inv_norm)  # (N, R)
        ctx.save_for_backward(x, weight, inv_norm, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, inv_norm, out = ctx.saved_tensors
        # out = (x . w) / |w|:  d out / d x = w / |w|;  d out / d w = (x - out * w / |w|) / |w|
        scaled = grad * inv_norm  # (N, R)
        grad_x = scaled @ weight if ctx.needs_input_grad[0] else None  # (N, d)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = scaled.T @ x  # (R, d)
            along_w = (scaled * out).sum(dim=0) * inv_norm  # (R,)
            grad_weight.addcmul_(weight, along_w[:, None], value=-1.0)  # in place: no (R, d) temporary
        return grad_x, grad_weight


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split by class over ranks: (N, S) local logits -> scalar.

    Every rank holds all N rows (the global batch) and its own S columns. The row max and the
    sums of exp (and the target logit, which lives on one rank) are all-reduced, so the loss is
    the same on every rank; the gradient of the local logits is (softmax - onehot) / N.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, distributed: bool) -> torch.Tensor:
        n = len(logits)
        if logits.shape[1]:
            row_max = logits.amax(dim=1)  # (N,)
        else:  # a rank without classes
            row_max = logits.new_full((n,), -math.inf)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp_()  # (N, S), at most 1: no overflow
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        sums = logits.new_zeros(2, n)
        sums[0] = exp.sum(dim=1)  # sum of exp over this rank's columns
        sums[1, rows] = logits[rows, cols] - row_max[rows]  # the target logit, shifted
        if distributed:
            dist.all_reduce(sums)
        loss = (sums[0].log() - sums[1]).mean()
        softmax = exp.div_(sums[0][:, None])  # (N, S)
        ctx.save_for_backward(softmax, rows, cols)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, rows, cols = ctx.saved_tensors
        scale = grad_loss / len(softmax)
        grad = softmax * scale
        grad[rows, cols] -= scale
        return grad, None, None


def _all_gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rank r's (sizes[r], ...) rows -> all ranks' rows concatenated in rank order."""
    padded = max(sizes)
    send = tensor.contiguous()
    if len(send) < padded:  # all_gather wants equal shapes: pad, then cut the padding off
        send = torch.cat([send, send.new_zeros((padded - len(send), *send.shape[1:]))])
    parts = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(parts, send)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _input_problem(features: torch.Tensor, labels: torch.Tensor, in_features: int) -> str | None:
    """What is wrong with this rank's forward inputs, or None."""
    if features.ndim != 2 or features.shape[1] != in_features:
        return f"features must have shape (N, {in_features}), got {tuple(features.shape)}"
    if not features.is_floating_point():
        return f"features must be floating point, got {features.dtype}"
    if not torch.is_tensor(labels) or labels.dtype == torch.bool or labels.is_floating_point() \
            or labels.is_complex():
        kind = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
        return f"labels must be an integer tensor (class indices), got {kind}"
    if labels.shape != features.shape[:1]:
        return f"labels must have shape ({len(features)},) to match the features, got {tuple(labels.shape)}"
    return None


def _is_row_state(value: object, weight: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == weight.shape


def _mix_seed(*values: int) -> int:
    """splitmix64 folded over the values: nearby (seed, step, rank) give unrelated seeds."""
    state = 0
    for value in values:
        state = (state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1  # 63 bits: any torch.Generator accepts it
