"""arcface.rerank: hand-made cases with known answers, and plain dense reference implementations."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from arcface.metrics import ranking_metrics, retrieval_metrics
from arcface.rerank import (Rerank, _Items, _neighbour_lists, cosine_top_k, k_reciprocal_top_k,
                            query_expansion, reciprocal_sets, rerank_top_k, reranked_metrics)

# ------------------------------------------------------------------------------------------
# Plain references: full matrices, Python sets and loops, float64; small sizes only.


def nearest_lists(cosine: torch.Tensor) -> list[list[int]]:
    """Every item's ranking of all items: itself first, then by cosine descending, index ascending."""
    size = cosine.shape[0]
    return [[p] + sorted((i for i in range(size) if i != p), key=lambda i: (-cosine[p, i].item(), i))
            for p in range(size)]


def reference_qe_scores(query: torch.Tensor, gallery: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """(Q, G) cosine of alpha-QE queries against the DBA gallery, straight from the formulas."""
    def expand(vectors: torch.Tensor, database: torch.Tensor, skip_self: bool) -> torch.Tensor:
        rows = []
        for i, vector in enumerate(vectors):
            similarity = database @ vector
            candidates = [j for j in range(database.shape[0]) if not (skip_self and j == i)]
            best = sorted(candidates, key=lambda j: (-similarity[j].item(), j))[:k]
            total = vector.clone()
            for j in best:
                total += max(similarity[j].item(), 0.0) ** alpha * database[j]
            rows.append(F.normalize(total, dim=0))
        return torch.stack(rows)

    gallery_unit = F.normalize(gallery.double(), dim=1)
    gallery_dba = expand(gallery_unit, gallery_unit, skip_self=True)
    query_qe = expand(F.normalize(query.double(), dim=1), gallery_dba, skip_self=False)
    return query_qe @ gallery_dba.T


def reference_kr_scores(query: torch.Tensor, gallery: torch.Tensor, k1: int, k2: int,
                        lambda_: float) -> tuple[torch.Tensor, list[set[int]], list[set[int]]]:
    """(Q, G) lambda cos + (1 - lambda)(1 - d_J) with the (N, N) matrices; also R(p, k1) and R*(p)."""
    items = F.normalize(torch.cat([query, gallery]).double(), dim=1)
    size, num_query = items.shape[0], query.shape[0]
    cosine = items @ items.T
    ranking = nearest_lists(cosine)

    def reciprocal(p: int, k: int) -> set[int]:
        return {x for x in ranking[p][:k] if p in ranking[x][:k]}

    half = math.ceil(k1 / 2)
    weights = torch.zeros(size, size, dtype=torch.float64)
    plain_sets, expanded_sets = [], []
    for p in range(size):
        members = reciprocal(p, k1)
        expanded = set(members)
        for q in members:
            candidate = reciprocal(q, half)
            if len(members & candidate) >= 2 / 3 * len(candidate):
                expanded |= candidate
        for x in expanded:
            weights[p, x] = math.exp(-(1 - cosine[p, x].item()))
        plain_sets.append(members)
        expanded_sets.append(expanded)
    local = torch.stack([weights[ranking[p][:k2]].mean(dim=0) for p in range(size)])
    scores = torch.empty(num_query, size - num_query, dtype=torch.float64)
    for p in range(num_query):
        for g in range(size - num_query):
            v_p, v_g = local[p], local[num_query + g]
            jaccard_distance = 1 - torch.minimum(v_p, v_g).sum() / torch.maximum(v_p, v_g).sum()
            scores[p, g] = lambda_ * cosine[p, num_query + g] + (1 - lambda_) * (1 - jaccard_distance)
    return scores, plain_sets, expanded_sets


def ranked_by(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top k by score descending, equal scores by index ascending."""
    return torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]


def clustered(num_query: int, num_gallery: int, num_items: int, dim: int, seed: int):
    """Random embeddings around one centre per item: neighbourhoods with real structure."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_items, dim, generator=generator, dtype=torch.float64)
    query_labels = torch.randint(num_items, (num_query,), generator=generator)
    gallery_labels = torch.cat([torch.arange(num_items), torch.randint(num_items, (num_gallery - num_items,),
                                                                       generator=generator)])
    query = centres[query_labels] + 0.8 * torch.randn(num_query, dim, generator=generator, dtype=torch.float64)
    gallery = centres[gallery_labels] + 0.8 * torch.randn(num_gallery, dim, generator=generator,
                                                          dtype=torch.float64)
    return query, gallery, query_labels, gallery_labels


# ------------------------------------------------------------------------------------------
# none


def test_none_is_retrieval_metrics_bit_for_bit():
    query, gallery, query_labels, gallery_labels = clustered(40, 30, 10, 8, seed=1)
    query, gallery = query.float(), gallery.float()
    for chunk_size in (7, 1024):
        expected = retrieval_metrics(query, gallery, query_labels, gallery_labels, recall_at=(1, 5),
                                     map_at=(3, 10), chunk_size=chunk_size)
        assert reranked_metrics(query, gallery, query_labels, gallery_labels, Rerank(), recall_at=(1, 5),
                                map_at=(3, 10), chunk_size=chunk_size) == expected


def test_ranking_metrics_of_the_cosine_ranking_equal_retrieval_metrics_exactly():
    query, gallery, query_labels, gallery_labels = clustered(50, 30, 10, 8, seed=2)
    query_labels[3] = 99  # a query without any relevant item: skipped by both, with a warning
    ranked = ranked_by(F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T, 30)
    for ap_mode in ("IR", "integrate"):
        with pytest.warns(UserWarning, match="1 of 50 queries"):
            expected = retrieval_metrics(query, gallery, query_labels, gallery_labels, recall_at=(1, 4),
                                         map_at=(10,), ap_mode=ap_mode, chunk_size=16)
        with pytest.warns(UserWarning, match="1 of 50 queries"):
            got = ranking_metrics(ranked, query_labels, gallery_labels, recall_at=(1, 4), map_at=(10,),
                                  ap_mode=ap_mode, chunk_size=16)
        assert got == expected


@pytest.mark.parametrize("ranked, message", [
    (torch.zeros(3, 2, dtype=torch.long), r"shape \(3, k >= 5\)"),
    (torch.zeros(2, 5, dtype=torch.long), r"shape \(3, k >= 5\)"),
    (torch.zeros(3, 5), "integer gallery indices"),
    (torch.full((3, 5), 6), "outside the gallery 0..5"),
])
def test_ranking_metrics_rejects_bad_rankings(ranked, message):
    with pytest.raises(ValueError, match=message):
        ranking_metrics(ranked, torch.tensor([0, 1, 2]), torch.arange(6), recall_at=(1,), map_at=(5,))


# ------------------------------------------------------------------------------------------
# qe


def test_qe_brings_the_true_match_from_second_to_first_because_its_neighbours_agree():
    # The query looks along x. B (item 0) is the nearest gallery image, the true match A1 (item 2)
    # second. A1's gallery neighbours A2, A3 are the same item and lie right beside it; B's only
    # close neighbour is C (item 1), above it in z. DBA pulls B towards C, away from the query,
    # and leaves A1 in its cluster; the expanded query then finds A1 first.
    gallery = torch.tensor([[1.0, 0.18, 0.0],    # B   item 0
                            [1.0, 0.18, 0.3],    # C   item 1
                            [1.0, -0.2, 0.0],    # A1  item 2
                            [1.0, -0.25, 0.0],   # A2  item 2
                            [1.0, -0.25, -0.05]])  # A3 item 2
    gallery_labels = torch.tensor([0, 1, 2, 2, 2])
    query, query_labels = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([2])
    _, plain = cosine_top_k(query, gallery, 5)
    assert plain[0, :2].tolist() == [0, 2]  # B first, A1 second
    rerank = Rerank("qe", qe_k=1, qe_alpha=3.0)
    scores, reranked = rerank_top_k(query, gallery, 5, rerank)
    assert reranked[0].tolist() == [2, 3, 4, 0, 1]  # the A cluster first, then B and C
    expected = reference_qe_scores(query, gallery, k=1, alpha=3.0)[0]
    assert scores[0].double() == pytest.approx(expected[reranked[0]].tolist(), abs=1e-6)
    assert retrieval_metrics(query, gallery, query_labels, gallery_labels)["recall@1"] == 0.0
    assert reranked_metrics(query, gallery, query_labels, gallery_labels, rerank)["recall@1"] == 100.0


@pytest.mark.parametrize("k, alpha", [(1, 3.0), (3, 1.0), (4, 500.0), (50, 2.5)])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_qe_chunked_equals_the_plain_formulas(k, alpha, chunk_size):
    query, gallery, *_ = clustered(13, 17, 5, 6, seed=3)
    expected = reference_qe_scores(query, gallery, k, alpha)
    scores, ranked = rerank_top_k(query, gallery, 6, Rerank("qe", qe_k=k, qe_alpha=alpha), chunk_size)
    assert torch.equal(ranked, ranked_by(expected, 6))
    assert torch.allclose(scores, expected.gather(1, ranked), atol=1e-12)


def test_qe_vectors_are_unit_float32_and_search_like_rerank_top_k():
    query, gallery, *_ = clustered(9, 11, 3, 5, seed=4)
    query, gallery = query.float() * 7, gallery.float() * 3
    expanded_query, expanded_gallery = query_expansion(query, gallery, k=2, alpha=3.0)
    assert expanded_query.dtype == expanded_gallery.dtype == torch.float32
    assert expanded_query.norm(dim=1) == pytest.approx([1.0] * 9, abs=1e-6)
    assert expanded_gallery.norm(dim=1) == pytest.approx([1.0] * 11, abs=1e-6)
    scores, ranked = cosine_top_k(expanded_query, expanded_gallery, 4)
    chunked_scores, chunked_ranked = rerank_top_k(query, gallery, 4, Rerank("qe", qe_k=2, qe_alpha=3.0), chunk_size=2)
    assert torch.equal(chunked_ranked, ranked) and torch.allclose(chunked_scores, scores, atol=1e-6)


# ------------------------------------------------------------------------------------------
# kr


def circle(degrees: list[float]) -> torch.Tensor:
    angles = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_k_reciprocal_sets_by_hand():
    # Six unit vectors at these angles; cosine falls with the angle between two of them.
    #   item:   0    1    2    3    4    5
    #   angle:  0   10   25   60   65  125
    # N(p, 3), p itself first:   0: 0 1 2   1: 1 0 2   2: 2 1 0   3: 3 4 2   4: 4 3 2   5: 5 4 3
    # R(p, 3) keeps x when p is in N(x, 3):
    #   0, 1, 2: {0, 1, 2} (each in the others' lists)
    #   3: {3, 4}; 2 is among 3's nearest, but 3 is not among 2's    4: {4, 3}, likewise
    #   5: {5}; 4 and 3 are its nearest, it is in neither's list
    items = circle([0, 10, 25, 60, 65, 125])
    neighbours = _neighbour_lists(_Items(items[:2], items[2:]), 3, chunk_size=4)  # 2 queries, 4 gallery
    assert neighbours.tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, 2], [4, 3, 2], [5, 4, 3]]
    assert reciprocal_sets(neighbours, 3, chunk_size=4).tolist() == [
        [0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, -1], [4, 3, -1], [5, -1, -1]]
    # Against the reference's sets as well.
    _, plain_sets, _ = reference_kr_scores(items[:2], items[2:], k1=3, k2=1, lambda_=0.3)
    assert plain_sets == [{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {3, 4}, {3, 4}, {5}]


def test_an_item_is_its_own_first_neighbour_even_beside_a_duplicate():
    items = circle([0, 0, 40])  # items 0 and 1 are the same vector
    neighbours = _neighbour_lists(_Items(items[:1], items[1:]), 3, chunk_size=2)
    assert neighbours.tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]


def test_jaccard_distance_of_identical_sets_is_zero():
    # The query is a copy of gallery item 1: same neighbours, same V, so d_J = 0 and, with
    # lambda = 0, its score 1 - d_J is exactly 1; items sharing nothing with it score 0.
    items = circle([0, 10, 20, 30, 150, 160, 170])
    query, gallery = items[1:2].clone(), items
    scores, ranked = k_reciprocal_top_k(query, gallery, 7, k1=3, k2=2, lambda_=0.0)
    assert ranked[0, 0].item() == 1 and scores[0, 0].item() == 1.0
    far = [position for position, index in enumerate(ranked[0].tolist()) if index >= 4]
    assert scores[0, far].tolist() == [0.0, 0.0, 0.0]


def test_kr_with_lambda_one_is_the_cosine_ranking_bit_for_bit():
    query, gallery, query_labels, gallery_labels = clustered(30, 25, 6, 8, seed=5)
    query, gallery = query.float(), gallery.float()
    for chunk_size in (4, 1024):
        scores, ranked = rerank_top_k(query, gallery, 10, Rerank("kr", kr_lambda=1.0), chunk_size)
        plain_scores, plain_ranked = cosine_top_k(query, gallery, 10, chunk_size)
        assert torch.equal(ranked, plain_ranked) and torch.equal(scores, plain_scores)
        rerank = Rerank("kr", kr_k1=5, kr_k2=3, kr_lambda=1.0)
        assert reranked_metrics(query, gallery, query_labels, gallery_labels, rerank, recall_at=(1, 5),
                                chunk_size=chunk_size) == retrieval_metrics(
            query, gallery, query_labels, gallery_labels, recall_at=(1, 5), chunk_size=chunk_size)


@pytest.mark.parametrize("k1, k2, lambda_", [(6, 3, 0.3), (4, 1, 0.0), (9, 9, 0.7), (100, 6, 0.3)])
@pytest.mark.parametrize("chunk_size, max_pairs", [(1, 1), (5, 37), (1024, 2**18)])
def test_kr_chunked_equals_the_plain_dense_reference(k1, k2, lambda_, chunk_size, max_pairs):
    query, gallery, *_ = clustered(14, 19, 4, 6, seed=6)
    expected, plain_sets, expanded_sets = reference_kr_scores(query, gallery, k1, k2, lambda_)
    if k1 == 6:  # the example exercises the 2/3 expansion, not only the reciprocal sets
        assert any(expanded != plain for expanded, plain in zip(expanded_sets, plain_sets))
    scores, ranked = k_reciprocal_top_k(query, gallery, 8, k1, k2, lambda_, chunk_size, max_pairs)
    assert torch.equal(ranked, ranked_by(expected, 8))
    assert torch.allclose(scores, expected.gather(1, ranked), atol=1e-8)  # V in 2**-32 fixed point


def test_kr_improves_mAP_on_clustered_data_and_scores_are_best_first():
    query, gallery, query_labels, gallery_labels = clustered(60, 80, 12, 16, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = retrieval_metrics(query, gallery, query_labels, gallery_labels, map_at=(10,))
        reranked = reranked_metrics(query, gallery, query_labels, gallery_labels,
                                    Rerank("kr", kr_k1=8, kr_k2=3), map_at=(10,))
    assert reranked["mAP@10"] > plain["mAP@10"]
    scores, _ = rerank_top_k(query.float(), gallery.float(), 5, Rerank("kr"))
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


# ------------------------------------------------------------------------------------------
# settings and inputs


@pytest.mark.parametrize("change, message", [
    (dict(method="dba"), "method must be one of"),
    (dict(qe_k=0), "qe_k must be an integer >= 1"),
    (dict(qe_alpha=-1.0), "qe_alpha must be >= 0"),
    (dict(qe_alpha=float("nan")), "qe_alpha must be >= 0"),
    (dict(kr_k1=0), "kr_k1 must be"),
    (dict(kr_k2=2.0), "kr_k2 must be"),
    (dict(kr_lambda=1.5), r"kr_lambda must lie in \[0, 1\]"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Rerank(**{"method": "kr", **change})


def test_describe_names_the_parameters_of_the_method_only():
    assert Rerank().describe() == {"method": "none"}
    assert Rerank("qe", qe_k=4, qe_alpha=2.0).describe() == {"method": "qe", "qe_k": 4, "qe_alpha": 2.0}
    assert Rerank("kr").describe() == {"method": "kr", "kr_k1": 20, "kr_k2": 6, "kr_lambda": 0.3}


def test_bad_embeddings_are_refused():
    good = torch.randn(3, 4)
    with pytest.raises(ValueError, match="query dim 4 != gallery dim 5"):
        rerank_top_k(good, torch.randn(3, 5), 2, Rerank("qe"))
    with pytest.raises(ValueError, match="gallery contains NaN"):
        rerank_top_k(good, torch.full((2, 4), math.nan), 2, Rerank("kr"))
    with pytest.raises(ValueError, match="non-empty 2-D"):
        rerank_top_k(torch.zeros(0, 4), good, 2, Rerank("kr"))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        rerank_top_k(good, good, 0, Rerank("qe"))
