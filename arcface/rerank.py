"""Re-ranking a query / gallery search: alpha query expansion with database-side augmentation
("qe"), and k-reciprocal re-ranking ("kr").

Both work on whole embedding sets: under torchrun they run on the gathered embeddings (on rank 0,
like the plain ranking), so a re-ranked evaluation is as exact under any world size as the plain
one. Cosine similarity is the base score, as in arcface.metrics; equal scores are ordered by
gallery index, lowest first.

qe: alpha-QE (Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation",
    2018) after DBA (database-side augmentation). With x^ the unit vector of x and
    w(s) = max(s, 0) ** alpha:
        g'_i = (g^_i + sum over the k gallery items j != i nearest g_i of w(cos(g_i, g_j)) g^_j)^
        q'   = (q^ + sum over the k items j of g' nearest q of w(cos(q^, g'_j)) g'_j)^
    then q' is searched in g' by cosine similarity. Memory: g' and (chunk, G) similarity blocks;
    the expanded queries are made and searched one chunk at a time.

kr: k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
    k-reciprocal Encoding", CVPR 2017) as the authors' published Python re_ranking(q_g_dist,
    q_q_dist, g_g_dist, k1, k2, lambda_value) computes it (the code ReID baselines use and their
    numbers come from), given the Euclidean distances of the L2-normalised embeddings, over the
    N = Q + G items of both sets. With d0(a, b) = ||a^ - b^||^2 = 2 - 2 cos(a, b):
      M_p      = max over all N items x of d0(p, x) (the reference's column maxima);
      d(p, x)  = d0(p, x) / M_p, the reference's original_dist (normalised, transposed);
      N(p, k)  the k items nearest p, p itself first (N(p, 1) = {p}): the reference's
               initial_rank[p, :k];
      R(p, k)  = {x in N(p, k) : p in N(x, k)} (p is one);
      R*(p)    = R(p, k1 + 1) united with every R(q, h + 1), q in R(p, k1 + 1), h = round(k1 / 2)
                 (halves to even, as numpy), that shares strictly more than 2/3 of its members
                 with R(p, k1 + 1);
      V_p      sparse over the N items: V_p[x] = exp(-d(p, x)) / sum over y in R*(p) of
               exp(-d(p, y)) for x in R*(p), else 0 (each row sums to 1);
      V_p      <- the mean of V_x over x in N(p, k2) (local query expansion; k2 = 1: none);
      d_J(p,g) = 1 - m / (2 - m), m = sum_x min(V_p[x], V_g[x]) (= 1 - sum min / sum max, as
                 every row sums to 1);
      d*(q,g)  = (1 - lambda) d_J(q, g) + lambda d(q, g).
    So k1 counts the neighbours besides the item itself (N(p, k1 + 1)), and k2 counts the item.
    The gallery is ranked by d* ascending (equal values by gallery index; the reference's
    argsort leaves their order open), reported as the score 1 - d*. Rankings equal the
    reference's up to exact ties; the reference rounds d to float32 (and V to float16 in its
    first version), which can swap items whose d* differ by less than that rounding. lambda = 1
    ranks by d(q, g), for one query a decreasing function of the cosine: computed in float64
    from the cosines, it keeps float32 cosines apart, so for float32 embeddings it is the
    cosine ranking of retrieval_metrics, bit for bit (float64 cosines one unit in the last
    place apart may tie and are then ordered by index).
    The naive form holds (N, N) distance and V matrices (In-Shop: 26,830^2 floats, 2.9 GB each);
    here only neighbour lists (N, k1 + 1) and sparse V rows are kept, M_p is taken while the
    neighbour lists are made, similarities are computed in (chunk, Q) and (chunk, G) blocks, and
    the Jaccard sums are joined over the shared support of V rows in blocks of at most
    `max_pairs` pairs. V is held in fixed point (int64, units of 2**-32), each row rounded to sum
    exactly 1, so every sum over it is an integer sum, exact in any order, and the result is
    deterministic (the mean over N(p, k2) is kept as a sum: m is divided by k2).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from arcface.metrics import _top_k_stable, ranking_metrics, retrieval_metrics

RERANK_METHODS = ("none", "qe", "kr")
# qe: chosen on the demo model (docs/TOOLS.md): on half its queries, the largest mAP@10 whose
# Recall@1 is at most one point below plain cosine ranking. alpha must spread the weights over
# the neighbours' cosines; the demo's nearest neighbours all lie above 0.99, so it is large. For
# embeddings whose neighbours' cosines spread more, the literature's alpha = 3 is the usual choice.
QE_K = 3
QE_ALPHA = 500.0
# kr: the paper's values for Market-1501 (k1 = 20, k2 = 6, lambda = 0.3), in the meaning of the
# authors' code (module docstring), kept (not tuned here).
KR_K1 = 20
KR_K2 = 6
KR_LAMBDA = 0.3
# V in fixed point: weights in [0, 1] in units of 2**-32, int64. An expanded V row sums to k2 * 2**32;
# the Jaccard quotient m / (2 - m) divides such sums in float64, exact while k2 < 2**20.
_FIXED_POINT = 2**32
_MAX_K2 = 2**20


@dataclass(frozen=True)
class Rerank:
    """Which re-ranking, with its parameters; "none" is plain cosine ranking."""

    method: str = "none"
    qe_k: int = QE_K  # qe: gallery neighbours added to each gallery vector (DBA) and each query
    qe_alpha: float = QE_ALPHA  # qe: neighbour weight max(cos, 0) ** alpha; 0 averages them evenly
    kr_k1: int = KR_K1  # kr: neighbours besides the item itself whose reciprocity makes R(p, k1 + 1)
    kr_k2: int = KR_K2  # kr: items (the item itself first) averaged into V_p; 1 turns it off
    kr_lambda: float = KR_LAMBDA  # kr: weight of the original distance against the Jaccard distance

    def __post_init__(self) -> None:
        if self.method not in RERANK_METHODS:
            raise ValueError(f"rerank: method must be one of {RERANK_METHODS}, got {self.method!r}")
        for name in ("qe_k", "kr_k1", "kr_k2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rerank: {name} must be an integer >= 1, got {value!r}")
        if not self.qe_alpha >= 0:  # also refuses NaN
            raise ValueError(f"rerank: qe_alpha must be >= 0, got {self.qe_alpha!r}")
        if not 0 <= self.kr_lambda <= 1:
            raise ValueError(f"rerank: kr_lambda must lie in [0, 1], got {self.kr_lambda!r}")

    def describe(self) -> dict[str, object]:
        """The method and the parameters it uses, for result files."""
        prefix = {"none": None, "qe": "qe_", "kr": "kr_"}[self.method]
        return {key: value for key, value in asdict(self).items()
                if key == "method" or (prefix and key.startswith(prefix))}


def reranked_metrics(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    rerank: Rerank,
    recall_at: tuple[int, ...] = (1,),
    map_at: tuple[int, ...] = (10,),
    ap_mode: str = "IR",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """retrieval_metrics of the re-ranked search; method "none" is retrieval_metrics itself."""
    if rerank.method == "none":
        return retrieval_metrics(query, gallery, query_labels, gallery_labels, recall_at=recall_at,
                                 map_at=map_at, ap_mode=ap_mode, chunk_size=chunk_size)
    _check_embeddings(query, gallery)
    top_k = min(max((*recall_at, *map_at), default=1), gallery.shape[0])
    _, ranked = rerank_top_k(query, gallery, top_k, rerank, chunk_size)
    return ranking_metrics(ranked, query_labels, gallery_labels, recall_at=recall_at, map_at=map_at,
                           ap_mode=ap_mode, chunk_size=chunk_size)


def rerank_top_k(
    query: Tensor, gallery: Tensor, k: int, rerank: Rerank, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Scores (Q, k') and gallery indices (Q, k') of each query's best gallery items, best first.

    k' = min(k, G). Scores: cosine similarity ("none"), cosine similarity of the expanded vectors
    ("qe"), 1 - d* with d* = (1 - lambda) d_J + lambda ||q - g||^2 / M_q ("kr", module docstring).
    """
    _check_embeddings(query, gallery)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"rerank: k must be an integer >= 1, got {k!r}")
    if rerank.method == "kr":
        return k_reciprocal_top_k(query, gallery, k, rerank.kr_k1, rerank.kr_k2, rerank.kr_lambda, chunk_size)
    if rerank.method == "qe":
        return _query_expansion_top_k(query, gallery, k, rerank.qe_k, rerank.qe_alpha, chunk_size)
    return cosine_top_k(query, gallery, k, chunk_size)


def cosine_top_k(
    query: Tensor, gallery: Tensor, k: int, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Cosine scores (Q, k') and gallery indices (Q, k'), best first, k' = min(k, G)."""
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    gallery_unit = F.normalize(gallery.to(compute_dtype), dim=1)
    k = min(k, gallery.shape[0])
    scores = torch.empty(query.shape[0], k, dtype=compute_dtype, device=query.device)
    indices = torch.empty(query.shape[0], k, dtype=torch.long, device=query.device)
    for start in range(0, query.shape[0], chunk_size):
        stop = min(start + chunk_size, query.shape[0])
        similarity = F.normalize(query[start:stop].to(compute_dtype), dim=1) @ gallery_unit.T  # (chunk, G)
        indices[start:stop] = _top_k_stable(similarity, k)
        scores[start:stop] = similarity.gather(1, indices[start:stop])
        del similarity  # freed before the next chunk's block is allocated
    return scores, indices


# ------------------------------------------------------------------------------------------
# qe: alpha query expansion with database-side augmentation


def query_expansion(
    query: Tensor, gallery: Tensor, k: int = QE_K, alpha: float = QE_ALPHA, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """(Q, D) expanded queries q' and (G, D) augmented gallery g', both L2-normalised.

    DBA first (each gallery vector with its k nearest other gallery vectors), then alpha-QE of
    each query with its k nearest augmented gallery vectors; weights max(cos, 0) ** alpha, the
    vector itself weight 1. See the module docstring for the formulas.
    """
    _check_embeddings(query, gallery)
    gallery_expanded = _augment_database(gallery, k, alpha, chunk_size)
    return _expand(query, gallery_expanded, None, k, alpha, chunk_size, skip_self=False), gallery_expanded


def _query_expansion_top_k(query: Tensor, gallery: Tensor, k: int, qe_k: int, alpha: float,
                           chunk_size: int) -> tuple[Tensor, Tensor]:
    """cosine_top_k of query_expansion's vectors, without holding every expanded query at once."""
    gallery_expanded = _augment_database(gallery, qe_k, alpha, chunk_size)  # (G, D) unit
    k = min(k, gallery.shape[0])
    scores = torch.empty(query.shape[0], k, dtype=gallery_expanded.dtype, device=query.device)
    indices = torch.empty(query.shape[0], k, dtype=torch.long, device=query.device)
    for start in range(0, query.shape[0], chunk_size):
        stop = min(start + chunk_size, query.shape[0])
        expanded = _expand(query[start:stop], gallery_expanded, None, qe_k, alpha, chunk_size, skip_self=False)
        similarity = expanded @ gallery_expanded.T  # (chunk, G)
        indices[start:stop] = _top_k_stable(similarity, k)
        scores[start:stop] = similarity.gather(1, indices[start:stop])
        del similarity  # freed before the next chunk's block is allocated
    return scores, indices


def _augment_database(gallery: Tensor, k: int, alpha: float, chunk_size: int) -> Tensor:
    """(G, D) DBA: each gallery vector with its k nearest others; no normalised copy of the input."""
    compute_dtype = torch.promote_types(gallery.dtype, torch.float32)
    gallery = gallery.to(compute_dtype)
    norms = gallery.norm(dim=1).clamp(min=1e-12)  # F.normalize's eps
    return _expand(gallery, gallery, norms, k, alpha, chunk_size, skip_self=True)


def _expand(rows: Tensor, database: Tensor, database_norms: Tensor | None, k: int, alpha: float,
            chunk_size: int, skip_self: bool) -> Tensor:
    """(n, D) unit vectors: each row's unit vector plus its k nearest database vectors, weighted.

    `database` holds unit vectors, or any vectors with their norms in `database_norms`. With
    `skip_self`, row i is database item i and is not its own neighbour.
    """
    k = min(k, database.shape[0] - int(skip_self))
    expanded = torch.empty(rows.shape[0], rows.shape[1], dtype=database.dtype, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        stop = min(start + chunk_size, rows.shape[0])
        unit = F.normalize(rows[start:stop].to(database.dtype), dim=1)  # (chunk, D)
        chunk = unit.clone()
        if k > 0:
            similarity = unit @ database.T  # (chunk, G)
            if database_norms is not None:
                similarity.div_(database_norms)
            if skip_self:
                own = torch.arange(start, stop, device=rows.device)
                similarity[own - start, own] = -torch.inf
            neighbours = _top_k_stable(similarity, k)  # (chunk, k)
            weights = similarity.gather(1, neighbours).clamp(min=0).pow(alpha)  # (chunk, k)
            del similarity
            if database_norms is not None:
                weights /= database_norms[neighbours]  # the neighbours' unit vectors
            for j in range(k):  # one (chunk, D) gather at a time, not a (chunk, k, D) block
                chunk.addcmul_(weights[:, j:j + 1], database[neighbours[:, j]])
        expanded[start:stop] = F.normalize(chunk, dim=1)
    return expanded


# ------------------------------------------------------------------------------------------
# kr: k-reciprocal re-ranking


def k_reciprocal_top_k(
    query: Tensor,
    gallery: Tensor,
    k: int,
    k1: int = KR_K1,
    k2: int = KR_K2,
    lambda_: float = KR_LAMBDA,
    chunk_size: int = 1024,
    max_pairs: int = 2**18,
) -> tuple[Tensor, Tensor]:
    """Scores 1 - d* (Q, k') and gallery indices (Q, k') after k-reciprocal re-ranking, best first.

    d* is the final distance of Zhong et al.'s published re_ranking(q_g_dist, q_q_dist, g_g_dist,
    k1, k2, lambda_value) given squared Euclidean distances of the L2-normalised embeddings (module
    docstring). Items are the queries (0..Q-1) then the gallery (Q..Q+G-1). Memory: one
    L2-normalised copy of the gallery, (chunk, Q) or (chunk, G) similarity blocks, (N, max(k1 + 1,
    k2)) neighbour lists, sparse V rows, and at most `max_pairs` Jaccard pairs at a time
    (docs/TOOLS.md: about 350 MiB above the embeddings at In-Shop size).
    """
    _check_embeddings(query, gallery)
    Rerank("kr", kr_k1=k1, kr_k2=k2, kr_lambda=lambda_)  # validates the parameters
    items = _Items(query, gallery)
    if min(k2, items.size) >= _MAX_K2:
        raise ValueError(f"rerank: kr_k2 must be below {_MAX_K2} when there are as many items, got {k2}")
    neighbours, farthest = _neighbour_lists(items, max(k1 + 1, k2), chunk_size)  # (N, w) self first; (N,)
    weights = _gaussian_weights(items, farthest, _expanded_reciprocal_sets(neighbours, k1, chunk_size),
                                chunk_size)
    weights = _local_query_expansion(weights, neighbours[:, :k2], items.size)
    mass = min(k2, neighbours.shape[1]) * _FIXED_POINT  # every expanded V row sums to exactly this
    del neighbours
    return _jaccard_top_k(items, weights, mass, farthest, k, lambda_, chunk_size, max_pairs)


class _Items:
    """The N = Q + G items, queries first, without concatenating the two embedding sets."""

    def __init__(self, query: Tensor, gallery: Tensor) -> None:
        self.dtype = torch.promote_types(query.dtype, torch.float32)
        self.query = query
        self.query_norms = query.to(self.dtype).norm(dim=1).clamp(min=1e-12)  # F.normalize's eps
        self.gallery_unit = F.normalize(gallery.to(self.dtype), dim=1)  # as retrieval_metrics computes it
        self.num_query = query.shape[0]
        self.size = query.shape[0] + gallery.shape[0]
        self.device = query.device

    def unit(self, indices: Tensor) -> Tensor:
        """(m, D) unit vectors of the items `indices` (m,)."""
        out = torch.empty(indices.shape[0], self.gallery_unit.shape[1], dtype=self.dtype, device=self.device)
        is_query = indices < self.num_query
        out[is_query] = F.normalize(self.query[indices[is_query]].to(self.dtype), dim=1)
        out[~is_query] = self.gallery_unit[indices[~is_query] - self.num_query]
        return out

    def query_unit(self, start: int, stop: int) -> Tensor:
        return F.normalize(self.query[start:stop].to(self.dtype), dim=1)

    def similarity_parts(self, rows: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(first item, (m, part size) cosines) of unit vectors `rows` to the queries, then to the gallery.

        Two parts rather than one (m, N) block: only one of them is held at a time.
        """
        to_queries = rows @ self.query.to(self.dtype).T  # (m, Q)
        yield 0, to_queries.div_(self.query_norms)
        del to_queries
        yield self.num_query, rows @ self.gallery_unit.T  # (m, G)


def _squared_distance(cosine: Tensor) -> Tensor:
    """float64 ||a - b||^2 = 2 - 2 cos(a, b) of unit vectors; exact for float32 cosines of magnitude > 2^-29."""
    return 2 - 2 * cosine.double()


def _neighbour_lists(items: _Items, width: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(N, w) the w = min(width, N) items nearest each item, the item itself first, and (N,) float64
    M_p: the largest squared distance from each item to any of the N items (the reference's column maxima).

    Nearest means largest cosine, that is smallest squared distance; equal cosines by item index.
    """
    width = min(width, items.size)
    neighbours = torch.empty(items.size, width, dtype=torch.long, device=items.device)
    lowest = torch.empty(items.size, dtype=items.dtype, device=items.device)  # each item's smallest cosine
    for start in range(0, items.size, chunk_size):
        stop = min(start + chunk_size, items.size)
        own = torch.arange(start, stop, device=items.device)
        values, indices, minima = [], [], []
        for first, similarity in items.similarity_parts(items.unit(own)):
            minima.append(similarity.min(dim=1).values)
            mine = (own >= first) & (own < first + similarity.shape[1])
            similarity[(own - start)[mine], own[mine] - first] = torch.inf  # self first, even beside a duplicate
            best = _top_k_stable(similarity, min(width, similarity.shape[1]))
            values.append(similarity.gather(1, best))
            indices.append(best + first)
            del similarity
        # Equal values keep index order: each part lists them by index, and queries precede the gallery.
        values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
        neighbours[start:stop] = indices.gather(1, _top_k_stable(values, width))
        lowest[start:stop] = torch.stack(minima, dim=1).min(dim=1).values
    return neighbours, _squared_distance(lowest)


def reciprocal_sets(neighbours: Tensor, k: int, chunk_size: int = 4096) -> Tensor:
    """(N, k') R(p, k): row p holds N(p, k) with -1 where p is not among that item's own k nearest.

    `neighbours` (N, >= k) lists each item's nearest items, itself first; k' = min(k, width).
    N(p, k) counts p itself: the reference's k-reciprocal neighbours of p at k1 are R(p, k1 + 1).
    """
    nearest = neighbours[:, :k]
    reciprocal = torch.empty_like(nearest)
    for start in range(0, nearest.shape[0], chunk_size):
        own = nearest[start:start + chunk_size]  # (chunk, k)
        rows = torch.arange(start, start + own.shape[0], device=own.device)
        their_nearest = nearest[own]  # (chunk, k, k)
        mutual = (their_nearest == rows[:, None, None]).any(dim=2)
        reciprocal[start:start + own.shape[0]] = torch.where(mutual, own, -1)
    return reciprocal


def _expanded_reciprocal_sets(neighbours: Tensor, k1: int, chunk_size: int) -> Iterator[Tensor]:
    """R*(p) of every item, chunk by chunk: (chunk, m) rows, each row's members in ascending
    order, each once; -1 entries are padding."""
    full = reciprocal_sets(neighbours, k1 + 1, chunk_size)  # (N, k1 + 1) R(p, k1 + 1)
    half = reciprocal_sets(neighbours, round(k1 / 2) + 1, chunk_size)  # (N, h + 1); round: half to even, as np.around
    for start in range(0, full.shape[0], chunk_size):
        own = full[start:start + chunk_size]  # (chunk, k1 + 1) R(p, k1 + 1), -1 padded
        candidates = half[own.clamp(min=0)]  # (chunk, k1 + 1, h + 1) R(q, h + 1) of each q in R(p, k1 + 1)
        candidates = torch.where((own >= 0)[:, :, None] & (candidates >= 0), candidates, -1)
        in_own = (candidates[:, :, :, None] == own[:, None, None, :]).any(dim=3) & (candidates >= 0)
        shared = in_own.sum(dim=2)  # (chunk, k1 + 1) |R(p, k1 + 1) & R(q, h + 1)|
        size = (candidates >= 0).sum(dim=2)  # (chunk, k1 + 1) |R(q, h + 1)|, 0 for padding
        accepted = 3 * shared > 2 * size  # strictly more than 2/3 of its members (refuses padding)
        candidates = torch.where(accepted[:, :, None], candidates, -1)
        union = torch.cat([own, candidates.flatten(1)], dim=1).sort(dim=1).values  # -1 first
        repeated = torch.zeros_like(union, dtype=torch.bool)
        repeated[:, 1:] = union[:, 1:] == union[:, :-1]
        yield torch.where(repeated, -1, union)


@dataclass
class _SparseRows:
    """N sparse rows in CSR form: row p holds columns[offsets[p]:offsets[p + 1]] with their values."""

    offsets: Tensor  # (N + 1,) int64
    columns: Tensor  # (nnz,) int64, ascending within a row
    values: Tensor  # (nnz,) int64, fixed point

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The entries of rows `rows` (m,), concatenated: (owner position in `rows`, column, value)."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        return _expand_ranges(starts, lengths, self.columns, self.values)


def _expand_ranges(starts: Tensor, lengths: Tensor, *arrays: Tensor) -> tuple[Tensor, ...]:
    """(owner, *arrays[positions]) for the ranges starts[i] .. starts[i] + lengths[i] - 1, in order."""
    owner = torch.repeat_interleave(torch.arange(starts.shape[0], device=starts.device), lengths)
    first_of_range = torch.cumsum(lengths, dim=0) - lengths
    positions = torch.arange(owner.shape[0], device=starts.device) - first_of_range[owner] + starts[owner]
    return (owner, *(array[positions] for array in arrays))


def _gaussian_weights(items: _Items, farthest: Tensor, member_chunks: Iterator[Tensor],
                      chunk_size: int) -> _SparseRows:
    """V_p[x] = exp(-d(p, x)) / sum over y in R*(p) of exp(-d(p, y)) for x in R*(p), d(p, x) =
    ||p - x||^2 / M_p, as fixed-point sparse rows that each sum to exactly _FIXED_POINT.

    `farthest` (N,) holds M_p; `member_chunks` yields R*(p) for consecutive rows, (chunk, m) with -1 padding.
    """
    scale = torch.where(farthest > 0, farthest, 1.0)  # M_p = 0: every item equals p, every d is 0
    all_counts, all_columns, all_values, first_row = [], [], [], 0
    for members in member_chunks:
        valid = members >= 0
        row_in_chunk, position = valid.nonzero(as_tuple=True)  # row-major: each row's members ascending
        rows, columns = row_in_chunk + first_row, members[valid]
        cosine = torch.empty(columns.shape[0], dtype=items.dtype, device=members.device)
        for start in range(0, columns.shape[0], chunk_size):  # (chunk, D) gathers, not (chunk, m, D)
            stop = min(start + chunk_size, columns.shape[0])
            cosine[start:stop] = (items.unit(rows[start:stop]) * items.unit(columns[start:stop])).sum(dim=1)
        weight = torch.zeros(members.shape, dtype=torch.float64, device=members.device)
        weight[row_in_chunk, position] = torch.exp(-_squared_distance(cosine) / scale[rows])
        all_values.append(_fixed_point_rows(weight, valid)[valid])
        all_counts.append(valid.sum(dim=1))
        all_columns.append(columns)
        first_row += members.shape[0]
    offsets = torch.zeros(first_row + 1, dtype=torch.long, device=items.device)
    offsets[1:] = torch.cumsum(torch.cat(all_counts), dim=0)
    return _SparseRows(offsets, torch.cat(all_columns), torch.cat(all_values))


def _fixed_point_rows(weight: Tensor, valid: Tensor) -> Tensor:
    """(rows, m) int64: each row of `weight` (float64, zero off `valid`) divided by its sum, in units of
    2**-32, rounded so that every row sums to exactly 2**32 (largest remainders round up, ties by position)."""
    exact = weight / weight.sum(dim=1, keepdim=True) * _FIXED_POINT
    lower = exact.floor()
    remainder = torch.where(valid, exact - lower, -1.0)  # padding last
    missing = (_FIXED_POINT - lower.sum(dim=1)).long()  # units still to hand out, 0..members
    order = torch.argsort(remainder, dim=1, descending=True, stable=True)
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return lower.long() + (place < missing[:, None]).long()


def _local_query_expansion(weights: _SparseRows, nearest: Tensor, num_items: int,
                           chunk_size: int = 1024) -> _SparseRows:
    """V_p <- sum of V_x over x in N(p, k2) (`nearest` (N, k2), self first): k2 times the mean."""
    offsets = [torch.zeros(1, dtype=torch.long, device=nearest.device)]
    columns, values = [], []
    for start in range(0, nearest.shape[0], chunk_size):
        block = nearest[start:start + chunk_size]  # (chunk, k2)
        owner, column, value = weights.gather(block.reshape(-1))
        row = owner // block.shape[1]  # row within the chunk
        key, position = torch.unique(row * num_items + column, sorted=True, return_inverse=True)
        summed = torch.zeros(key.shape[0], dtype=value.dtype, device=value.device)
        summed.index_add_(0, position, value)  # integers: the same sum in any order
        counts = torch.bincount(key // num_items, minlength=block.shape[0])
        offsets.append(offsets[-1][-1] + torch.cumsum(counts, dim=0))
        columns.append(key % num_items)
        values.append(summed)
    return _SparseRows(torch.cat(offsets), torch.cat(columns), torch.cat(values))


def _jaccard_top_k(items: _Items, weights: _SparseRows, mass: int, farthest: Tensor, k: int, lambda_: float,
                   chunk_size: int, max_pairs: int) -> tuple[Tensor, Tensor]:
    """Each query's top k gallery items by 1 - d*, d* = (1 - lambda) d_J + lambda ||q - g||^2 / M_q:
    (scores in the embeddings' compute dtype, indices). Every V row sums to `mass`."""
    num_query, num_gallery = items.num_query, items.size - items.num_query
    # Inverted index of the gallery rows: for each column x, the gallery items g with V_g[x] > 0.
    gallery_entries = slice(int(weights.offsets[num_query]), None)
    gallery_owner = torch.repeat_interleave(torch.arange(num_gallery, device=items.device),
                                            weights.offsets[num_query:].diff())
    by_column = torch.argsort(weights.columns[gallery_entries], stable=True)
    column_gallery = gallery_owner[by_column]
    column_values = weights.values[gallery_entries][by_column]
    column_counts = torch.bincount(weights.columns[gallery_entries], minlength=items.size)
    column_starts = torch.cumsum(column_counts, dim=0) - column_counts
    del gallery_owner, by_column
    scale = torch.where(farthest > 0, farthest, 1.0)[:num_query]  # M_q, as in _gaussian_weights

    k = min(k, num_gallery)
    scores = torch.empty(num_query, k, dtype=items.dtype, device=items.device)
    indices = torch.empty(num_query, k, dtype=torch.long, device=items.device)
    for start in range(0, num_query, chunk_size):  # the chunks of retrieval_metrics: the same cosines
        stop = min(start + chunk_size, num_query)
        cosine = items.query_unit(start, stop) @ items.gallery_unit.T  # (chunk, G)
        for first, last in _blocks_of_pairs(weights, column_counts, start, stop, max_pairs, num_gallery):
            shared = _shared_mass(weights, first, last, num_gallery, column_starts, column_counts,
                                  column_gallery, column_values).double()  # (block, G) sum of minima
            # Rows of equal mass: sum of maxima = 2 mass - sum of minima, and 1 - d_J = m / (2 - m).
            similarity = shared / (2 * mass - shared)
            distance = _squared_distance(cosine[first - start:last - start]) / scale[first:last, None]
            # lambda = 1: 0 * d_J adds exactly 0, so the score is 1 - ||q - g||^2 / M_q (docs/TOOLS.md).
            score = 1 - ((1 - lambda_) * (1 - similarity) + lambda_ * distance)
            indices[first:last] = _top_k_stable(score, k)
            scores[first:last] = score.gather(1, indices[first:last]).to(items.dtype)
            del shared, similarity, distance, score
        del cosine  # freed before the next chunk's block is allocated
    return scores, indices


def _blocks_of_pairs(weights: _SparseRows, column_counts: Tensor, start: int, stop: int, max_pairs: int,
                     num_gallery: int) -> list[tuple[int, int]]:
    """Ranges of queries within start..stop-1: each at most max_pairs Jaccard pairs and
    max_pairs / G rows (its (rows, G) sums), or a single query."""
    entries = slice(int(weights.offsets[start]), int(weights.offsets[stop]))
    owner = torch.repeat_interleave(torch.arange(stop - start, device=column_counts.device),
                                    weights.offsets[start:stop + 1].diff())
    pairs = torch.zeros(stop - start, dtype=torch.long, device=column_counts.device)
    pairs.index_add_(0, owner, column_counts[weights.columns[entries]])
    max_rows = max(1, max_pairs // num_gallery)
    blocks, first, total = [], start, 0
    for offset, count in enumerate(pairs.tolist()):
        if (total + count > max_pairs or start + offset - first >= max_rows) and start + offset > first:
            blocks.append((first, start + offset))
            first, total = start + offset, 0
        total += count
    blocks.append((first, stop))
    return blocks


def _shared_mass(weights: _SparseRows, first: int, last: int, num_gallery: int,
                 column_starts: Tensor, column_counts: Tensor, column_gallery: Tensor,
                 column_values: Tensor) -> Tensor:
    """(last - first, G) int64: sum over x of min(V_p[x], V_g[x]) in fixed point, queries first..last-1."""
    device = weights.values.device
    entries = slice(int(weights.offsets[first]), int(weights.offsets[last]))
    entry_query = torch.repeat_interleave(torch.arange(last - first, device=device),
                                          weights.offsets[first:last + 1].diff())
    entry_columns = weights.columns[entries]
    # Every (query entry, gallery entry) pair that shares a column.
    owner, gallery, gallery_value = _expand_ranges(column_starts[entry_columns], column_counts[entry_columns],
                                                   column_gallery, column_values)
    minimum = torch.minimum(weights.values[entries][owner], gallery_value)
    shared = torch.zeros((last - first) * num_gallery, dtype=torch.long, device=device)
    shared.index_add_(0, entry_query[owner] * num_gallery + gallery, minimum)  # integers: any order
    return shared.view(last - first, num_gallery)


def _check_embeddings(query: Tensor, gallery: Tensor) -> None:
    for name, embeddings in (("query", query), ("gallery", gallery)):
        if embeddings.dim() != 2 or embeddings.shape[0] == 0 or not embeddings.is_floating_point():
            raise ValueError(f"rerank: {name} must be a non-empty 2-D floating-point (N, D) tensor, "
                             f"got {tuple(embeddings.shape)} {embeddings.dtype}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError(f"rerank: {name} contains NaN or infinite values")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"rerank: query dim {query.shape[1]} != gallery dim {gallery.shape[1]}")
    if query.device != gallery.device:
        raise ValueError(f"rerank: query on {query.device} but gallery on {gallery.device}")
