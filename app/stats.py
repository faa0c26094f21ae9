"""Quick, capped statistics for interactive use (exploratory; not the atlas's inference)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlas import schema
from atlas.stats import bh_adjust

QUICK_DE_SEED = 0


def rank_sum_test(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Wilcoxon rank-sum (Mann–Whitney U, normal approximation with continuity
    and tie correction) for every column of ``a`` (n1 x g) against ``b`` (n2 x g).

    Returns (z, p). Vectorised over genes in numpy (average ranks for ties).
    """
    from scipy import special

    n1, n2 = a.shape[0], b.shape[0]
    x = np.vstack([a, b])
    ranks, tie = _average_ranks(x)
    r1 = ranks[:n1].sum(axis=0)
    u = r1 - n1 * (n1 + 1) / 2.0
    mu = n1 * n2 / 2.0
    n = n1 + n2
    sigma = np.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, (u - mu - np.sign(u - mu) * 0.5) / sigma, 0.0)
    p = 2 * special.ndtr(-np.abs(z))
    return z, p


def _average_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise ranks (1-based, ties averaged) and per-column tie sums (t^3 - t)."""
    xt = np.ascontiguousarray(x.T)  # genes x cells: each row contiguous
    g, n = xt.shape
    order = np.argsort(xt, axis=1, kind="stable")
    s = np.take_along_axis(xt, order, axis=1)
    new = np.ones((g, n), dtype=bool)  # first element of each run of equal values
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    last = np.ones((g, n), dtype=bool)  # last element of each run
    last[:, :-1] = new[:, 1:]
    pos = np.arange(n, dtype=np.float64)[None, :]
    start = np.maximum.accumulate(np.where(new, pos, 0.0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, n - 1.0)[:, ::-1], axis=1)[:, ::-1]
    avg = (start + end) / 2.0 + 1.0
    ranks = np.empty_like(avg)
    np.put_along_axis(ranks, order, avg, axis=1)
    t = np.where(last, end - start + 1.0, 0.0)
    tie = (t**3 - t).sum(axis=1)
    return ranks.T, tie


def quick_de(
    view,
    selected: np.ndarray,
    *,
    max_cells: int,
    genes: list[str] | None = None,
    seed: int = QUICK_DE_SEED,
) -> tuple[pd.DataFrame, str]:
    """Selection vs rest on the atlas's variable genes, at most ``max_cells`` cells in all.

    Beyond the cap each group is a fixed random subset (half the cap each, or all of the
    smaller group). Returns (table sorted by p, a one-line note of what was compared).
    """
    rng = np.random.default_rng(seed)
    n = view.n_cells
    sel = np.asarray(selected, dtype=np.int64)
    if sel.size > 1 and not np.all(sel[1:] > sel[:-1]):
        sel = np.unique(sel)
    rest_mask = np.ones(n, dtype=bool)
    rest_mask[sel] = False
    rest = np.flatnonzero(rest_mask)
    half = max(1, max_cells // 2)
    n_sel = min(len(sel), max(half, max_cells - len(rest)))
    n_rest = min(len(rest), max_cells - n_sel)
    capped = n_sel < len(sel) or n_rest < len(rest)
    s_idx = np.sort(rng.choice(sel, n_sel, replace=False)) if n_sel < len(sel) else sel
    r_idx = np.sort(rng.choice(rest, n_rest, replace=False)) if n_rest < len(rest) else rest
    genes = genes or view.variable_genes
    m = view.genes_matrix(genes, cells=np.concatenate([s_idx, r_idx]))
    a, b = m[: len(s_idx)], m[len(s_idx) :]
    z, p = rank_sum_test(a, b)
    mean_a = np.expm1(a).mean(axis=0)
    mean_b = np.expm1(b).mean(axis=0)
    lfc = np.log2((mean_a + 1e-2) / (mean_b + 1e-2))
    res = (
        pd.DataFrame(
            {
                "gene": genes,
                "log2fc": lfc,
                "pct_sel": (a > 0).mean(axis=0),
                "pct_rest": (b > 0).mean(axis=0),
                "z": z,
                "pvalue": p,
                "padj": bh_adjust(p),
            }
        )
        .sort_values([schema.COL_PADJ, schema.COL_PVALUE], kind="stable")
        .reset_index(drop=True)
    )
    note = (
        f"Compared {len(s_idx):,} selected vs {len(r_idx):,} other cells on {len(genes)} "
        "variable genes"
        + (f" (random subsets: capped at {max_cells:,} cells in all)." if capped else ".")
    )
    return res, note
