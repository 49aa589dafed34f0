"""arcface.rerank: hand-made cases with known answers, and plain dense reference implementations
(kr: Zhong et al.'s published re_ranking, written here from its definitions)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcface.metrics import ranking_metrics, retrieval_metrics
from arcface.rerank import (Rerank, _expanded_reciprocal_sets, _fixed_point_rows, _Items, _neighbour_lists,
                            cosine_top_k, k_reciprocal_top_k, query_expansion, reciprocal_sets, rerank_top_k,
                            reranked_metrics)

# ------------------------------------------------------------------------------------------
# Plain references: full matrices, Python sets and loops, float64; small sizes only.


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


def euclidean_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances, the matrices the usual callers hand the published code."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))


def initial_ranking(dist: np.ndarray) -> np.ndarray:
    """argsort of each row of `dist`; exact ties (an item and its duplicates) put the item itself
    first, then lower indices: one of the orders an argsort may give them."""
    size = dist.shape[0]
    return np.stack([np.lexsort((np.arange(size), dist[p], np.arange(size) != p)) for p in range(size)])


def published_re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int, k2: int,
                         lambda_value: float, strict: bool = True) -> tuple[np.ndarray, list[set[int]],
                                                                            list[set[int]]]:
    """(Q, G) final distances of Zhong et al.'s published re_ranking, written densely from its
    definitions in float64; also the k-reciprocal sets at k1 and their expansions, per item.

    `strict` False is the variant with a non-strict 2/3 test, to show the tests can tell them apart.
    """
    num_query = q_g_dist.shape[0]
    squared = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]) ** 2
    dist = (squared / squared.max(axis=0, keepdims=True)).T  # columns by their maxima, transposed
    size = dist.shape[0]
    rank = initial_ranking(dist)

    def k_reciprocal(p: int, k: int) -> list[int]:
        return [x for x in rank[p, :k + 1] if p in rank[x, :k + 1]]

    half = int(np.around(k1 / 2))
    weights = np.zeros((size, size))
    plain_sets, expanded_sets = [], []
    for p in range(size):
        members = k_reciprocal(p, k1)
        expanded = list(members)
        for candidate in members:
            candidate_members = k_reciprocal(candidate, half)
            shared = len(np.intersect1d(candidate_members, members))
            if shared > 2 / 3 * len(candidate_members) or (not strict and shared >= 2 / 3 * len(candidate_members)):
                expanded += candidate_members
        expanded = np.unique(expanded)
        weight = np.exp(-dist[p, expanded])
        weights[p, expanded] = weight / weight.sum()
        plain_sets.append(set(members))
        expanded_sets.append(set(expanded.tolist()))
    if k2 != 1:
        weights = np.stack([weights[rank[p, :k2]].mean(axis=0) for p in range(size)])
    shared_mass = np.stack([np.minimum(weights[p], weights).sum(axis=1) for p in range(num_query)])  # (Q, N)
    jaccard = 1 - shared_mass / (2 - shared_mass)
    final = jaccard * (1 - lambda_value) + dist[:num_query] * lambda_value
    return final[:, num_query:], plain_sets, expanded_sets


def reference_kr(query: torch.Tensor, gallery: torch.Tensor, k1: int, k2: int, lambda_: float,
                 strict: bool = True) -> tuple[np.ndarray, list[set[int]], list[set[int]]]:
    """published_re_ranking of the L2-normalised embeddings' Euclidean distances."""
    query_unit = F.normalize(query.double(), dim=1).numpy()
    gallery_unit = F.normalize(gallery.double(), dim=1).numpy()
    return published_re_ranking(euclidean_distances(query_unit, gallery_unit),
                                euclidean_distances(query_unit, query_unit),
                                euclidean_distances(gallery_unit, gallery_unit), k1, k2, lambda_, strict)


def assert_same_ranking_up_to_ties(ranked: torch.Tensor, final: np.ndarray, atol: float = 1e-8) -> None:
    """Each row of `ranked` lists distinct gallery items whose reference distances are the row's
    smallest, in ascending order: the reference's ranking, where items differ only if tied."""
    k = ranked.shape[1]
    assert all(len(set(row)) == k for row in ranked.tolist())
    got = np.take_along_axis(final, ranked.numpy(), axis=1)
    assert np.allclose(got, np.sort(final, axis=1)[:, :k], rtol=0, atol=atol)


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


def with_duplicates(seed: int):
    """clustered data with exact copies: three gallery items twice more, two queries in the gallery."""
    query, gallery, query_labels, gallery_labels = clustered(12, 20, 4, 6, seed=seed)
    copies = torch.tensor([0, 3, 3, 7])
    gallery = torch.cat([gallery, gallery[copies], query[[1, 5]] * 2.0])  # a scaled copy normalises alike
    gallery_labels = torch.cat([gallery_labels, gallery_labels[copies], query_labels[[1, 5]]])
    return query, gallery, query_labels, gallery_labels


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
    neighbours, farthest = _neighbour_lists(_Items(items[:2], items[2:]), 3, chunk_size=4)  # 2 queries, 4 gallery
    assert neighbours.tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, 2], [4, 3, 2], [5, 4, 3]]
    assert reciprocal_sets(neighbours, 3, chunk_size=4).tolist() == [
        [0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, -1], [4, 3, -1], [5, -1, -1]]
    # The reference's k1 counts the neighbours besides the item: its k1 = 2 is N(p, 3).
    _, plain_sets, _ = reference_kr(items[:2], items[2:], k1=2, k2=1, lambda_=0.3)
    assert plain_sets == [{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {3, 4}, {3, 4}, {5}]
    # M_p, the largest squared distance from p: to item 5 for items 0..3, to item 0 for items 4 and 5.
    farthest_angle = torch.deg2rad(torch.tensor([125.0, 115, 100, 65, 65, 125], dtype=torch.float64))
    assert farthest.tolist() == pytest.approx((2 - 2 * farthest_angle.cos()).tolist(), abs=1e-12)


def test_an_item_is_its_own_first_neighbour_even_beside_a_duplicate():
    items = circle([0, 0, 40])  # items 0 and 1 are the same vector
    neighbours, _ = _neighbour_lists(_Items(items[:1], items[1:]), 3, chunk_size=2)
    assert neighbours.tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]


def test_the_column_maxima_are_taken_over_all_items_chunk_by_chunk():
    query, gallery, *_ = clustered(9, 14, 3, 5, seed=12)
    items = torch.cat([F.normalize(query, dim=1), F.normalize(gallery, dim=1)])
    dense = torch.cdist(items, items).pow(2).max(dim=0).values  # the (N, N) matrix's column maxima
    for chunk_size in (1, 4, 1024):
        _, farthest = _neighbour_lists(_Items(query, gallery), 3, chunk_size)
        assert torch.allclose(farthest, dense, rtol=0, atol=1e-12)


def test_fixed_point_rows_sum_to_exactly_one():
    generator = torch.Generator().manual_seed(13)
    valid = torch.rand(50, 30, generator=generator) < 0.6
    valid[:, 0] = True  # an item is always in its own set
    weight = torch.where(valid, torch.rand(50, 30, generator=generator, dtype=torch.float64), 0.0)
    fixed = _fixed_point_rows(weight, valid)
    assert fixed.sum(dim=1).tolist() == [2**32] * 50
    assert bool((fixed[~valid] == 0).all())
    exact = weight / weight.sum(dim=1, keepdim=True) * 2**32
    assert bool(((fixed - exact).abs() < 1).all())  # each rounded down or up


# (queries, gallery, items, dim, seed, k1, k2, lambda, small chunks): small and large k1 (k1 + 1 > N
# in the last), k2 = 1 and > 1, lambda 0, between and 1; each also in one chunk.
KR_CASES = [
    (14, 19, 4, 6, 6, 6, 3, 0.3, (1, 1)),
    (14, 19, 4, 6, 6, 1, 1, 0.0, (5, 37)),
    (14, 19, 4, 6, 6, 2, 2, 0.7, (1, 1)),
    (16, 30, 6, 8, 8, 20, 6, 0.3, (5, 37)),
    (4, 40, 10, 8, 9, 5, 1, 0.3, (3, 50)),
    (20, 12, 4, 6, 10, 3, 4, 1.0, (5, 37)),
    (10, 11, 3, 6, 11, 100, 6, 0.3, (2, 20)),
]


@pytest.mark.parametrize("num_query, num_gallery, num_items, dim, seed, k1, k2, lambda_, small", KR_CASES)
def test_kr_equals_the_published_algorithm(num_query, num_gallery, num_items, dim, seed, k1, k2, lambda_, small):
    query, gallery, query_labels, gallery_labels = clustered(num_query, num_gallery, num_items, dim, seed)
    final, _, _ = reference_kr(query, gallery, k1, k2, lambda_)
    k = min(10, num_gallery)
    expected = torch.from_numpy(np.argsort(final, axis=1, kind="stable")[:, :k])
    expected_metrics = ranking_metrics(expected, query_labels, gallery_labels, recall_at=(1,), map_at=(10,))
    for chunk_size, max_pairs in (small, (1024, 2**18)):  # chunks of queries and items; Jaccard pairs
        scores, ranked = k_reciprocal_top_k(query, gallery, k, k1, k2, lambda_, chunk_size, max_pairs)
        assert torch.equal(ranked, expected)  # no ties in these data: the very same lists
        assert scores.numpy() == pytest.approx(1 - np.take_along_axis(final, expected.numpy(), axis=1), abs=1e-8)
        assert ranking_metrics(ranked, query_labels, gallery_labels, recall_at=(1,), map_at=(10,)) == expected_metrics


@pytest.mark.parametrize("k1, k2, lambda_", [(2, 1, 0.3), (6, 3, 0.3), (1, 2, 0.0), (20, 6, 0.3)])
def test_kr_equals_the_published_algorithm_with_duplicates(k1, k2, lambda_):
    query, gallery, query_labels, gallery_labels = with_duplicates(seed=14)
    final, _, _ = reference_kr(query, gallery, k1, k2, lambda_)
    expected = torch.from_numpy(np.argsort(final, axis=1, kind="stable")[:, :10])
    expected_metrics = ranking_metrics(expected, query_labels, gallery_labels, recall_at=(1, 5), map_at=(10,))
    for chunk_size, max_pairs in ((3, 50), (1024, 2**18)):
        _, ranked = k_reciprocal_top_k(query, gallery, 10, k1, k2, lambda_, chunk_size, max_pairs)
        assert_same_ranking_up_to_ties(ranked, final)
        assert ranking_metrics(ranked, query_labels, gallery_labels, recall_at=(1, 5), map_at=(10,)) == \
            expected_metrics


def test_the_expanded_sets_are_the_published_ones_and_the_two_thirds_test_is_strict():
    query, gallery, *_ = clustered(14, 19, 4, 6, seed=6)
    for k1 in (2, 3, 4, 6, 9):
        _, _, expanded_sets = reference_kr(query, gallery, k1, 1, 0.3)
        neighbours, _ = _neighbour_lists(_Items(query, gallery), k1 + 1, chunk_size=5)
        got = [set(row) - {-1} for chunk in _expanded_reciprocal_sets(neighbours, k1, 5) for row in chunk.tolist()]
        assert got == expanded_sets
    # With k1 = 3 some candidate set shares exactly 2/3 of its members: refused by the strict test,
    # so a non-strict one would change the sets, and the distances.
    _, _, loose_sets = reference_kr(query, gallery, 3, 1, 0.3, strict=False)
    _, _, strict_sets = reference_kr(query, gallery, 3, 1, 0.3)
    assert loose_sets != strict_sets


def test_jaccard_distance_of_identical_sets_is_zero():
    # The query is a copy of gallery item 1: same neighbours, same V, so d_J = 0 and, with
    # lambda = 0, its score 1 - d_J is exactly 1; items sharing nothing with it score 0.
    items = circle([0, 10, 20, 30, 150, 160, 170])
    query, gallery = items[1:2].clone(), items
    scores, ranked = k_reciprocal_top_k(query, gallery, 7, k1=2, k2=2, lambda_=0.0)
    assert ranked[0, 0].item() == 1 and scores[0, 0].item() == 1.0
    far = [position for position, index in enumerate(ranked[0].tolist()) if index >= 4]
    assert scores[0, far].tolist() == [0.0, 0.0, 0.0]


def test_kr_with_lambda_one_is_the_cosine_ranking_of_float32_embeddings():
    # lambda = 1 ranks by ||q - g||^2 / M_q, computed in float64 from float32 cosines: the cosine
    # ranking, bit for bit; the scores are 1 - ||q - g||^2 / M_q.
    query, gallery, query_labels, gallery_labels = clustered(30, 25, 6, 8, seed=5)
    query, gallery = query.float(), gallery.float()
    items = torch.cat([F.normalize(query.double(), dim=1), F.normalize(gallery.double(), dim=1)])
    farthest = torch.cdist(items, items).pow(2).max(dim=1).values[:30]
    for chunk_size in (4, 1024):
        scores, ranked = rerank_top_k(query, gallery, 10, Rerank("kr", kr_lambda=1.0), chunk_size)
        plain_scores, plain_ranked = cosine_top_k(query, gallery, 10, chunk_size)
        assert torch.equal(ranked, plain_ranked)
        expected = 1 - (2 - 2 * plain_scores.double()) / farthest[:, None]
        assert scores.double() == pytest.approx(expected, abs=1e-6)
        rerank = Rerank("kr", kr_k1=4, kr_k2=3, kr_lambda=1.0)
        assert reranked_metrics(query, gallery, query_labels, gallery_labels, rerank, recall_at=(1, 5),
                                chunk_size=chunk_size) == retrieval_metrics(
            query, gallery, query_labels, gallery_labels, recall_at=(1, 5), chunk_size=chunk_size)


def test_kr_improves_mAP_on_clustered_data_and_scores_are_best_first():
    query, gallery, query_labels, gallery_labels = clustered(60, 80, 12, 16, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = retrieval_metrics(query, gallery, query_labels, gallery_labels, map_at=(10,))
        reranked = reranked_metrics(query, gallery, query_labels, gallery_labels,
                                    Rerank("kr", kr_k1=7, kr_k2=3), map_at=(10,))
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
