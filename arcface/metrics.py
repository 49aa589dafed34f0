"""Retrieval metrics with mmpretrain's semantics: Recall@K and mAP@K of queries against a gallery.

The gallery is ranked for each query by cosine similarity, highest first; a gallery item is
relevant when its label equals the query's label. Queries are processed in chunks so memory is
O(chunk_size x gallery) and only the top max(K) items of each row are ever ordered.

Ties: items with equal similarity are ordered by gallery index, lowest first, so results do not
depend on how torch.topk happens to break ties.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

AP_MODES = ("IR", "integrate")


def retrieval_metrics(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    recall_at: Sequence[int] = (1,),
    map_at: Sequence[int] = (10,),
    ap_mode: str = "IR",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K and mAP@K (percent) of `query` (Q, D) against `gallery` (G, D).

    Returns {"recall@K": ..., "mAP@K": ..., "num_queries": evaluated, "num_skipped": skipped}.
    AP@K sums, over the relevant items at 0-based ranks r_i < K (i counting hits from 1), the
    precision i / (r_i + 1) ("IR") or the mean of the precision just before and at the hit
    ("integrate"), and divides by R, the query's total number of relevant gallery items.
    Queries without any relevant gallery item are excluded from every mean and counted in
    "num_skipped" (with a warning). Embeddings are L2-normalised here; float16/bfloat16 inputs
    are computed in float32, float64 inputs in float64.
    """
    _check_inputs(query, gallery, query_labels, gallery_labels, recall_at, map_at, ap_mode, chunk_size)
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    sums = _MetricSums(query_labels, gallery_labels, query.device, recall_at, map_at, ap_mode)
    gallery_unit = F.normalize(gallery.to(compute_dtype), dim=1)
    for start in range(0, query.shape[0], chunk_size):
        query_unit = F.normalize(query[start:start + chunk_size].to(compute_dtype), dim=1)
        similarity = torch.mm(query_unit, gallery_unit.T)  # (chunk, G)
        ranked = _top_k_stable(similarity, sums.top_k)  # (chunk, top_k) gallery indices
        del similarity  # freed before the next chunk's matrix is allocated
        sums.add(start, ranked)
    return sums.metrics()


def ranking_metrics(
    ranked: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    recall_at: Sequence[int] = (1,),
    map_at: Sequence[int] = (10,),
    ap_mode: str = "IR",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """retrieval_metrics of rankings made elsewhere (re-ranking): `ranked` (Q, k) gallery indices, best first.

    Row q lists query q's best gallery items; k must be at least min(max(K), G), and columns
    beyond that are ignored. Same semantics, skipping and dictionary as retrieval_metrics, and
    the same numbers, bit for bit, when `ranked` is retrieval_metrics' own ranking (rows are
    summed in the same chunks).
    """
    _check_ranking(ranked, query_labels, gallery_labels, recall_at, map_at, ap_mode, chunk_size)
    sums = _MetricSums(query_labels, gallery_labels, ranked.device, recall_at, map_at, ap_mode)
    for start in range(0, ranked.shape[0], chunk_size):
        sums.add(start, ranked[start:start + chunk_size, :sums.top_k])
    return sums.metrics()


class _MetricSums:
    """Running Recall@K hit counts and AP@K sums over chunks of ranked queries."""

    def __init__(self, query_labels: Tensor, gallery_labels: Tensor, device: torch.device,
                 recall_at: Sequence[int], map_at: Sequence[int], ap_mode: str) -> None:
        self.query_labels = query_labels.to(device)
        self.gallery_labels = gallery_labels.to(device)
        self.num_relevant = _count_relevant(self.query_labels, self.gallery_labels)  # (Q,) R of each query
        self.num_queries = int((self.num_relevant > 0).sum())
        self.num_skipped = len(self.query_labels) - self.num_queries
        _check_answerable(self.num_queries, self.num_skipped)
        self.top_k = min(max((*recall_at, *map_at)), len(self.gallery_labels))
        self.ap_mode = ap_mode
        self.recall_hits = {k: 0 for k in recall_at}
        self.ap_sums = {k: 0.0 for k in map_at}

    def add(self, start: int, ranked: Tensor) -> None:
        """`ranked` (chunk, top_k): gallery indices, best first, of the queries from `start` on."""
        stop = start + len(ranked)
        hits = self.gallery_labels[ranked] == self.query_labels[start:stop, None]  # (chunk, top_k)
        chunk_relevant = self.num_relevant[start:stop]
        evaluated = chunk_relevant > 0
        for k in self.recall_hits:
            self.recall_hits[k] += int((hits[:, :k].any(dim=1) & evaluated).sum())
        ap_terms = _ap_terms(hits, self.ap_mode)
        for k in self.ap_sums:
            ap = ap_terms[:, :k].sum(dim=1) / chunk_relevant.clamp(min=1)
            self.ap_sums[k] += float(ap[evaluated].sum())

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for k, hit_count in self.recall_hits.items():
            metrics[f"recall@{k}"] = 100.0 * hit_count / self.num_queries
        for k, ap_sum in self.ap_sums.items():
            metrics[f"mAP@{k}"] = 100.0 * ap_sum / self.num_queries
        metrics["num_queries"] = self.num_queries
        metrics["num_skipped"] = self.num_skipped
        return metrics


def _check_inputs(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    recall_at: Sequence[int],
    map_at: Sequence[int],
    ap_mode: str,
    chunk_size: int,
) -> None:
    for name, embeddings in (("query", query), ("gallery", gallery)):
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(
                f"retrieval_metrics: {name} must be a non-empty 2-D (N, D) tensor, "
                f"got shape {tuple(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"retrieval_metrics: {name} must be floating point, got {embeddings.dtype}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError(f"retrieval_metrics: {name} contains NaN or infinite values")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"retrieval_metrics: query dim {query.shape[1]} != gallery dim {gallery.shape[1]}"
        )
    if query.device != gallery.device:
        raise ValueError(f"retrieval_metrics: query on {query.device} but gallery on {gallery.device}")
    for name, labels, embeddings in (
        ("query_labels", query_labels, query),
        ("gallery_labels", gallery_labels, gallery),
    ):
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"retrieval_metrics: {name} must be 1-D with {embeddings.shape[0]} entries "
                f"(one per row), got shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"retrieval_metrics: {name} must be integer labels, got {labels.dtype}")
    _check_settings("retrieval_metrics", recall_at, map_at, ap_mode, chunk_size)


def _check_ranking(
    ranked: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    recall_at: Sequence[int],
    map_at: Sequence[int],
    ap_mode: str,
    chunk_size: int,
) -> None:
    _check_settings("ranking_metrics", recall_at, map_at, ap_mode, chunk_size)
    for name, labels in (("query_labels", query_labels), ("gallery_labels", gallery_labels)):
        if labels.dim() != 1 or labels.shape[0] == 0:
            raise ValueError(f"ranking_metrics: {name} must be non-empty and 1-D, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"ranking_metrics: {name} must be integer labels, got {labels.dtype}")
    needed = min(max((*recall_at, *map_at)), gallery_labels.shape[0])
    if ranked.dim() != 2 or ranked.shape[0] != query_labels.shape[0] or ranked.shape[1] < needed:
        raise ValueError(
            f"ranking_metrics: ranked must have shape ({query_labels.shape[0]}, k >= {needed}) "
            f"(one row per query, at least min(max K, gallery size) columns), got {tuple(ranked.shape)}"
        )
    if ranked.is_floating_point() or ranked.is_complex() or ranked.dtype == torch.bool:
        raise ValueError(f"ranking_metrics: ranked must hold integer gallery indices, got {ranked.dtype}")
    if ranked.numel() and (int(ranked.min()) < 0 or int(ranked.max()) >= gallery_labels.shape[0]):
        raise ValueError(
            f"ranking_metrics: ranked holds indices outside the gallery 0..{gallery_labels.shape[0] - 1}"
        )


def _check_settings(
    caller: str, recall_at: Sequence[int], map_at: Sequence[int], ap_mode: str, chunk_size: int
) -> None:
    for name, ks in (("recall_at", recall_at), ("map_at", map_at)):
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"{caller}: {name} entries must be integers >= 1, got {k!r}")
    if not recall_at and not map_at:
        raise ValueError(f"{caller}: recall_at and map_at are both empty; nothing to compute")
    if ap_mode not in AP_MODES:
        raise ValueError(f"{caller}: ap_mode must be one of {AP_MODES}, got {ap_mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{caller}: chunk_size must be an integer >= 1, got {chunk_size!r}")


def _check_answerable(num_queries: int, num_skipped: int) -> None:
    if num_queries == 0:
        raise ValueError(
            "retrieval_metrics: no query has a relevant gallery item (no query label occurs in "
            "gallery_labels); expected query and gallery labels to share one numbering"
        )
    if num_skipped:
        warnings.warn(
            f"retrieval_metrics: {num_skipped} of {num_queries + num_skipped} queries have no "
            "relevant gallery item; they are excluded from every metric",
            stacklevel=4,  # the caller of retrieval_metrics / ranking_metrics (via _MetricSums)
        )


def _count_relevant(query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """(Q,) number of gallery items sharing each query's label, from label counts."""
    gallery_classes, class_counts = torch.unique(gallery_labels, sorted=True, return_counts=True)
    position = torch.searchsorted(gallery_classes, query_labels).clamp(max=gallery_classes.numel() - 1)
    present = gallery_classes[position] == query_labels
    return torch.where(present, class_counts[position], torch.zeros_like(class_counts[position]))


def _top_k_stable(similarity: Tensor, k: int) -> Tensor:
    """(rows, k) gallery indices by similarity descending, equal similarities by index ascending."""
    # One extra value shows whether the k-th place is tied with the next one.
    num_values = min(k + 1, similarity.shape[1])
    values, indices = torch.topk(similarity, num_values, dim=1, largest=True, sorted=True)
    # topk leaves the order of equal values unspecified: put equal values in index order
    # (sort by index, then a stable sort by value keeps that order among equals).
    indices, by_index = indices[:, :k].sort(dim=1)
    by_value = values[:, :k].gather(1, by_index).sort(dim=1, descending=True, stable=True).indices
    top_indices = indices.gather(1, by_value)
    # When the k-th value equals the (k+1)-th, topk may have kept either of the tied items.
    # That needs duplicated embeddings (or all-zero vectors), so those rows alone get a full
    # stable sort.
    if num_values > k:
        cut_ties = values[:, k - 1] == values[:, k]
        if bool(cut_ties.any()):
            rows = cut_ties.nonzero().squeeze(1)
            order = similarity[rows].sort(dim=1, descending=True, stable=True).indices
            top_indices[rows] = order[:, :k]
    return top_indices


def _ap_terms(hits: Tensor, ap_mode: str) -> Tensor:
    """(rows, k) float64 contribution of each rank to AP; zero where the item is not relevant."""
    hits = hits.to(torch.float64)
    hit_count = hits.cumsum(dim=1)  # i: hits up to and including this rank
    rank = torch.arange(hits.shape[1], dtype=torch.float64, device=hits.device)  # r, 0-based
    precision = hit_count / (rank + 1)
    if ap_mode == "IR":
        return precision * hits
    # Precision just before the hit: (i - 1) / r, defined as 1 at the first rank.
    precision_before = torch.where(rank > 0, (hit_count - 1) / rank.clamp(min=1), torch.ones_like(precision))
    return (precision_before + precision) / 2 * hits
