"""retrieval_metrics against hand-computed rankings and an independent float64 brute force."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch

from arcface.metrics import retrieval_metrics

# Gallery ranked by construction: the item at rank r sits at angle 10*r degrees from the query
# direction (1, 0), so cosine similarity falls with r. Labels by rank:
#   rank:   0  1  2  3  4  5  6  7
#   label:  1  2  1  1  3  2  1  3
GALLERY_LABELS_BY_RANK = [1, 2, 1, 1, 3, 2, 1, 3]
# q0 (label 1): hits at ranks 0, 2, 3, 6, R = 4 (more relevant items than K = 3)
# q1 (label 2): hits at ranks 1, 5,       R = 2 (rank 5 lies outside the top 3)
# q2 (label 3): hits at ranks 4, 7,       R = 2 (nothing in the top 3)
# q3 (label 4): no relevant gallery item -> skipped
QUERY_LABELS = [1, 2, 3, 4]


def _hand_ranked_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ranks = torch.arange(8, dtype=torch.float64)
    angles = torch.deg2rad(10.0 * ranks)
    # Norms grow with rank, so a ranking by raw dot product (no normalisation) would differ.
    norms = 1.0 + 3.0 * ranks
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1) * norms[:, None]
    gallery_labels = torch.tensor(GALLERY_LABELS_BY_RANK)
    # Store the gallery out of rank order so ranking must come from the similarities.
    shuffle = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    query = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    return query, gallery[shuffle].float(), torch.tensor(QUERY_LABELS), gallery_labels[shuffle]


def _percent(value: Fraction) -> float:
    return 100.0 * float(value)


def _hand_metrics(ap_mode: str) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return retrieval_metrics(*_hand_ranked_problem(), recall_at=(1, 2, 5), map_at=(3, 5), ap_mode=ap_mode)


def test_recall_at_several_k_by_hand():
    metrics = _hand_metrics("IR")
    # q3 is skipped, so means are over 3 queries.
    # @1: only q0 has a hit at rank 0.            -> 1/3
    # @2: q0 (rank 0) and q1 (rank 1).            -> 2/3
    # @5: q0, q1 and q2 (rank 4 < 5).             -> 3/3
    assert metrics["recall@1"] == pytest.approx(_percent(Fraction(1, 3)), rel=1e-12)
    assert metrics["recall@2"] == pytest.approx(_percent(Fraction(2, 3)), rel=1e-12)
    assert metrics["recall@5"] == pytest.approx(100.0, rel=1e-12)


def test_map_ir_by_hand():
    metrics = _hand_metrics("IR")
    # AP@3, IR: sum of i/(r_i+1) over hits in the top 3, divided by R (not min(K, R)).
    #   q0: 1/1 + 2/3 = 5/3, / R=4 -> 5/12
    #   q1: 1/2,             / R=2 -> 1/4
    #   q2: no hit                 -> 0
    map3 = (Fraction(5, 12) + Fraction(1, 4) + 0) / 3  # = 2/9
    # AP@5, IR:
    #   q0: 1/1 + 2/3 + 3/4 = 29/12, / 4 -> 29/48
    #   q1: 1/2,                     / 2 -> 1/4
    #   q2: 1/5 (rank 4, first hit), / 2 -> 1/10
    map5 = (Fraction(29, 48) + Fraction(1, 4) + Fraction(1, 10)) / 3  # = 229/720
    assert map3 == Fraction(2, 9) and map5 == Fraction(229, 720)
    assert metrics["mAP@3"] == pytest.approx(_percent(map3), rel=1e-12)
    assert metrics["mAP@5"] == pytest.approx(_percent(map5), rel=1e-12)


def test_map_integrate_by_hand():
    metrics = _hand_metrics("integrate")
    # Per hit add (p_before + i/(r_i+1)) / 2 with p_before = (i-1)/r_i (1 at rank 0).
    # AP@3:
    #   q0: r=0: (1 + 1)/2 = 1; r=2, i=2: (1/2 + 2/3)/2 = 7/12; sum 19/12, / 4 -> 19/48
    #   q1: r=1, i=1: (0/1 + 1/2)/2 = 1/4,                          / 2 -> 1/8
    #   q2: no hit -> 0
    map3 = (Fraction(19, 48) + Fraction(1, 8) + 0) / 3  # = 25/144
    # AP@5:
    #   q0: add r=3, i=3: (2/3 + 3/4)/2 = 17/24; sum 55/24,         / 4 -> 55/96
    #   q1: unchanged                                                   -> 1/8
    #   q2: r=4, i=1: (0/4 + 1/5)/2 = 1/10,                         / 2 -> 1/20
    map5 = (Fraction(55, 96) + Fraction(1, 8) + Fraction(1, 20)) / 3  # = 359/1440
    assert map3 == Fraction(25, 144) and map5 == Fraction(359, 1440)
    assert metrics["mAP@3"] == pytest.approx(_percent(map3), rel=1e-12)
    assert metrics["mAP@5"] == pytest.approx(_percent(map5), rel=1e-12)


def test_query_without_relevant_item_is_skipped_warned_and_counted():
    with pytest.warns(UserWarning, match=r"1 of 4 queries"):
        metrics = retrieval_metrics(*_hand_ranked_problem(), recall_at=(1,), map_at=(3,))
    assert metrics["num_queries"] == 3
    assert metrics["num_skipped"] == 1
    # Same as evaluating the three answerable queries alone (no warning then).
    query, gallery, query_labels, gallery_labels = _hand_ranked_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answerable = retrieval_metrics(query[:3], gallery, query_labels[:3], gallery_labels, map_at=(3,))
    assert answerable["num_skipped"] == 0
    assert metrics["recall@1"] == answerable["recall@1"]
    assert metrics["mAP@3"] == answerable["mAP@3"]


def test_every_query_without_relevant_item_is_an_error():
    query, gallery, _, gallery_labels = _hand_ranked_problem()
    with pytest.raises(ValueError, match="no query has a relevant gallery item"):
        retrieval_metrics(query, gallery, torch.full((4,), 9), gallery_labels)


def test_equal_similarities_are_ordered_by_gallery_index():
    # Five identical gallery vectors: every item ties; the lowest index ranks first.
    gallery = torch.ones(5, 3)
    query = torch.ones(2, 3)
    query_labels = torch.tensor([7, 8])
    # q0 (label 7): relevant items at indices 0 and 3 -> ranks 0 and 3
    # q1 (label 8): relevant item at index 4 -> rank 4
    gallery_labels = torch.tensor([7, 1, 2, 7, 8])
    metrics = retrieval_metrics(query, gallery, query_labels, gallery_labels, recall_at=(1, 4), map_at=(4, 5))
    # recall@1 = 1/2 (q0 only); recall@4 = 1/2 (q1's hit is at rank 4, the fifth place)
    assert metrics["recall@1"] == pytest.approx(50.0)
    assert metrics["recall@4"] == pytest.approx(50.0)
    # AP@4: q0 = (1/1 + 2/4) / 2 = 3/4; q1 = 0 -> mean 3/8
    # AP@5: q0 = 3/4; q1 = (1/5) / 1 = 1/5 -> mean 19/40
    assert metrics["mAP@4"] == pytest.approx(_percent(Fraction(3, 8)), rel=1e-12)
    assert metrics["mAP@5"] == pytest.approx(_percent(Fraction(19, 40)), rel=1e-12)


def test_ties_across_the_top_k_cut_keep_the_lowest_indices():
    # 50 identical gallery vectors, so top-3 must choose among 50 equal items (torch.topk alone
    # may return any of them). Index order puts indices 0, 1, 2 in the top 3.
    gallery = torch.ones(50, 4)
    gallery_labels = torch.full((50,), 3)
    gallery_labels[1] = 7
    query = torch.ones(2, 4)
    query_labels = torch.tensor([7, 3])
    metrics = retrieval_metrics(query, gallery, query_labels, gallery_labels, recall_at=(1, 2), map_at=(3,))
    # q0 (label 7): single relevant item at rank 1 -> recall@1 miss, recall@2 hit, AP@3 = (1/2)/1
    # q1 (label 3): relevant at ranks 0 and 2, R = 49 -> AP@3 = (1/1 + 2/3)/49 = 5/147
    assert metrics["recall@1"] == pytest.approx(50.0)
    assert metrics["recall@2"] == pytest.approx(100.0)
    expected_map = (Fraction(1, 2) + Fraction(5, 147)) / 2
    assert metrics["mAP@3"] == pytest.approx(_percent(expected_map), rel=1e-12)


def test_k_larger_than_gallery_counts_every_item():
    query, gallery, query_labels, gallery_labels = _hand_ranked_problem()
    metrics = retrieval_metrics(
        query[:3], gallery, query_labels[:3], gallery_labels, recall_at=(100,), map_at=(100,)
    )
    assert metrics["recall@100"] == pytest.approx(100.0)
    # Full-list AP, IR: q0 = (1 + 2/3 + 3/4 + 4/7)/4, q1 = (1/2 + 2/6)/2, q2 = (1/5 + 2/8)/2
    q0 = (1 + Fraction(2, 3) + Fraction(3, 4) + Fraction(4, 7)) / 4
    q1 = (Fraction(1, 2) + Fraction(2, 6)) / 2
    q2 = (Fraction(1, 5) + Fraction(2, 8)) / 2
    assert metrics["mAP@100"] == pytest.approx(_percent((q0 + q1 + q2) / 3), rel=1e-12)


def test_a_k_given_twice_is_counted_once():
    # Each K is one running sum: naming it twice used to add every hit twice (recall@1 of 200%).
    problem = _random_problem(30, 40, 8, 5, seed=11)
    once = retrieval_metrics(*problem, recall_at=(1, 5), map_at=(10,), chunk_size=7)
    twice = retrieval_metrics(*problem, recall_at=(1, 1, 5), map_at=(10, 10), chunk_size=7)
    assert twice == once


def _random_problem(
    num_query: int, num_gallery: int, dim: int, num_labels: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_labels, dim, generator=generator)
    query_labels = torch.randint(num_labels, (num_query,), generator=generator)
    gallery_labels = torch.randint(num_labels, (num_gallery,), generator=generator)
    # Clustered embeddings give a realistic mix of hits and misses at every rank.
    query = centers[query_labels] + 1.5 * torch.randn(num_query, dim, generator=generator)
    gallery = centers[gallery_labels] + 1.5 * torch.randn(num_gallery, dim, generator=generator)
    return query, gallery, query_labels, gallery_labels


@pytest.mark.parametrize("ap_mode", ["IR", "integrate"])
@pytest.mark.parametrize("chunk_size", [1, 2, 7])
def test_chunked_equals_one_chunk(chunk_size: int, ap_mode: str):
    problem = _random_problem(45, 60, 16, 6, seed=chunk_size)
    kwargs = dict(recall_at=(1, 5, 10), map_at=(1, 10, 60), ap_mode=ap_mode)
    whole = retrieval_metrics(*problem, chunk_size=1024, **kwargs)
    chunked = retrieval_metrics(*problem, chunk_size=chunk_size, **kwargs)
    assert whole.keys() == chunked.keys()
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def _brute_force_metrics(
    query: torch.Tensor,
    gallery: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    recall_at: tuple[int, ...],
    map_at: tuple[int, ...],
    ap_mode: str,
) -> dict[str, float]:
    """Direct transcription of the definitions: full float64 similarity matrix, full sort."""
    q = query.double() / query.double().norm(dim=1, keepdim=True)
    g = gallery.double() / gallery.double().norm(dim=1, keepdim=True)
    order = torch.argsort(q @ g.T, dim=1, descending=True, stable=True)
    recalls = {k: [] for k in recall_at}
    aps = {k: [] for k in map_at}
    for row, label in enumerate(query_labels.tolist()):
        relevant = [gallery_labels[j].item() == label for j in order[row].tolist()]
        total_relevant = sum(relevant)
        if total_relevant == 0:
            continue
        for k in recall_at:
            recalls[k].append(any(relevant[:k]))
        for k in map_at:
            ap, hits = 0.0, 0
            for rank, is_hit in enumerate(relevant[:k]):
                if not is_hit:
                    continue
                hits += 1
                precision = hits / (rank + 1)
                if ap_mode == "IR":
                    ap += precision
                else:
                    before = (hits - 1) / rank if rank > 0 else 1.0
                    ap += (before + precision) / 2
            aps[k].append(ap / total_relevant)
    result = {f"recall@{k}": 100.0 * sum(v) / len(v) for k, v in recalls.items()}
    result.update({f"mAP@{k}": 100.0 * math.fsum(v) / len(v) for k, v in aps.items()})
    result["num_queries"] = len(next(iter(recalls.values())))
    return result


@pytest.mark.parametrize("ap_mode", ["IR", "integrate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agrees_with_float64_brute_force(ap_mode: str, dtype: torch.dtype):
    query, gallery, query_labels, gallery_labels = _random_problem(70, 90, 24, 9, seed=11)
    # Gallery labels 9 and 10 never occur: some queries get label 10 and are skipped.
    query_labels[:4] = 10
    recall_at, map_at = (1, 2, 5, 10), (1, 5, 10, 90)
    expected = _brute_force_metrics(query, gallery, query_labels, gallery_labels, recall_at, map_at, ap_mode)
    with pytest.warns(UserWarning, match="4 of 70 queries"):
        actual = retrieval_metrics(
            query.to(dtype), gallery.to(dtype), query_labels, gallery_labels,
            recall_at=recall_at, map_at=map_at, ap_mode=ap_mode, chunk_size=16,
        )
    assert actual["num_queries"] == expected["num_queries"] == 66
    assert actual["num_skipped"] == 4
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-9), key
    # The data must exercise partial scores, or the comparison proves little.
    assert 0.0 < actual["recall@1"] < 100.0 and 0.0 < actual["mAP@10"] < 100.0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(query=torch.zeros(4)), "query must be a non-empty 2-D"),
        (dict(gallery=torch.zeros(8, 3)), "query dim 2 != gallery dim 3"),
        (dict(query_labels=torch.zeros(3, dtype=torch.long)), "query_labels must be 1-D with 4 entries"),
        (dict(gallery_labels=torch.zeros(8)), "gallery_labels must be integer labels"),
        (dict(recall_at=(0,)), "recall_at entries must be integers >= 1"),
        (dict(map_at=(2.5,)), "map_at entries must be integers >= 1"),
        (dict(ap_mode="area"), "ap_mode must be one of"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(gallery=torch.full((8, 2), float("nan"))), "gallery contains NaN"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(change: dict, message: str):
    query, gallery, query_labels, gallery_labels = _hand_ranked_problem()
    arguments = dict(query=query, gallery=gallery, query_labels=query_labels, gallery_labels=gallery_labels)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**arguments)
