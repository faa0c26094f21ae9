"""A vectorised ``pydeseq2`` inference backend (same model, all genes at once).

``pydeseq2.default_inference.DefaultInference`` fits every gene separately (a scipy
L-BFGS-B call per gene for the dispersions, a Python IRLS loop per gene for the GLM),
which costs ~5 s per pseudobulk fit of ~2,500 genes x 16 samples. :class:`FastInference`
solves the same problems for all genes together with numpy:

* ``alpha_mle``: the same objective (NB negative log-likelihood + Cox-Reid adjustment
  [+ log-normal prior for MAP dispersions]) minimised over log(alpha) by a coarse grid
  over ``[min_disp, max_disp]`` followed by four zooming grids (final resolution < 0.001
  in log alpha), i.e. pydeseq2's own grid fallback, vectorised;
* ``irls``: batched IRLS with per-gene convergence (same start, ridge, tolerance);
  genes that diverge (|beta| > 30) or do not converge fall back to pydeseq2's per-gene
  solver;
* ``wald_test``: batched Wald statistics (same ridge, same formula);
* ``lin_reg_mu``: one least-squares solve for all genes.

Everything else (size factors, trend fit, Cooks, independent filtering) is pydeseq2's.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydeseq2 import utils
from pydeseq2.default_inference import DefaultInference
from scipy.special import gammaln
from scipy.stats import norm


def _nb_nll(counts: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """NB negative log-likelihood summed over samples (axis -2). Shapes broadcast.

    ``counts``, ``mu``: (..., n, G); ``alpha``: (..., 1, G).
    """
    a1 = 1.0 / alpha
    logbinom = gammaln(counts + a1) - gammaln(counts + 1.0) - gammaln(a1)
    term = a1 * np.log(alpha) - logbinom + (counts + a1) * np.log(mu + a1) - counts * np.log(mu)
    return term.sum(axis=-2)


def _xtwx(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """X^T diag(W_g) X for every gene: X (n, p), W (..., n, G) -> (..., G, p, p)."""
    n, p = X.shape
    XX = (X[:, :, None] * X[:, None, :]).reshape(n, p * p)
    Wt = np.swapaxes(W, -1, -2)  # ..., G, n
    return (Wt @ XX).reshape(*Wt.shape[:-1], p, p)


class FastInference(DefaultInference):
    """Vectorised drop-in for :class:`pydeseq2.default_inference.DefaultInference`."""

    def __init__(self, n_cpus: int = 1, chunk: int = 512):
        super().__init__(n_cpus=n_cpus)
        self._chunk = chunk

    # ---------------------------------------------------------------- dispersions
    def _alpha_loss(self, counts, X, mu, la, la_hat, prior_var, cr_reg, prior_reg):
        """Loss for log-alphas ``la`` (K, G) -> (K, G); constant terms dropped."""
        alpha = np.exp(la)[:, None, :]  # K,1,G
        a1 = 1.0 / alpha
        loss = (
            a1 * la[:, None, :]
            - gammaln(counts[None] + a1)
            + gammaln(a1)
            + (counts[None] + a1) * np.log(mu[None] + a1)
        ).sum(axis=1)
        if cr_reg:
            W = mu[None] / (1.0 + mu[None] * alpha)  # K,n,G
            M = _xtwx(X, W)  # K,G,p,p
            loss = loss + 0.5 * np.linalg.slogdet(M)[1]
        if prior_reg:
            loss = loss + (la - la_hat[None]) ** 2 / (2 * prior_var)
        return loss

    def alpha_mle(  # noqa: D102
        self,
        counts: np.ndarray,
        design_matrix: np.ndarray,
        mu: np.ndarray,
        alpha_hat: np.ndarray,
        min_disp: float,
        max_disp: float,
        prior_disp_var: float | None = None,
        cr_reg: bool = True,
        prior_reg: bool = False,
        optimizer: Literal["BFGS", "L-BFGS-B"] = "L-BFGS-B",
    ) -> tuple[np.ndarray, np.ndarray]:
        counts = np.asarray(counts, float)
        mu = np.asarray(mu, float)
        X = np.asarray(design_matrix, float)
        G = counts.shape[1]
        la_hat = np.log(np.asarray(alpha_hat, float))
        lo, hi = np.log(min_disp), np.log(max_disp)
        out = np.empty(G)
        for s in range(0, G, self._chunk):
            sl = slice(s, min(G, s + self._chunk))
            c, m, lh = counts[:, sl], mu[:, sl], la_hat[sl]
            g = c.shape[1]
            grid = np.linspace(lo, hi, 30)
            la = np.repeat(grid[:, None], g, axis=1)
            loss = self._alpha_loss(c, X, m, la, lh, prior_disp_var, cr_reg, prior_reg)
            best = la[np.nanargmin(loss, axis=0), np.arange(g)]
            h = grid[1] - grid[0]
            for _ in range(5):
                offs = np.linspace(-h, h, 9)
                la = np.clip(best[None, :] + offs[:, None], lo, hi)
                loss = self._alpha_loss(c, X, m, la, lh, prior_disp_var, cr_reg, prior_reg)
                best = la[np.nanargmin(loss, axis=0), np.arange(g)]
                h = offs[1] - offs[0]
            out[sl] = np.exp(best)
        return out, np.ones(G, dtype=bool)

    # ---------------------------------------------------------------- GLM
    def lin_reg_mu(  # noqa: D102
        self,
        counts: np.ndarray,
        size_factors: np.ndarray,
        design_matrix: np.ndarray,
        min_mu: float,
    ) -> np.ndarray:
        X = np.asarray(design_matrix, float)
        sf = np.asarray(size_factors, float)[:, None]
        coef = np.linalg.lstsq(X, np.asarray(counts, float) / sf, rcond=None)[0]
        return np.maximum(sf * (X @ coef), min_mu)

    def irls(  # noqa: D102
        self,
        counts: np.ndarray,
        size_factors: np.ndarray,
        design_matrix: np.ndarray,
        disp: np.ndarray,
        min_mu: float,
        beta_tol: float,
        min_beta: float = -30,
        max_beta: float = 30,
        optimizer: Literal["BFGS", "L-BFGS-B"] = "L-BFGS-B",
        maxiter: int = 250,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        Y = np.asarray(counts, float)  # n, G
        X = np.asarray(design_matrix, float)
        sf = np.asarray(size_factors, float)[:, None]
        disp = np.asarray(disp, float)[None, :]
        n, p = X.shape
        G = Y.shape[1]
        ridge = np.eye(p) * 1e-6
        full_rank = np.linalg.matrix_rank(X) == p
        if full_rank:
            Q, R = np.linalg.qr(X)
            beta = np.linalg.solve(R, Q.T @ np.log(Y / sf + 0.1)).T  # G,p
        else:
            beta = np.zeros((G, p))
            beta[:, 0] = np.log(Y / sf).mean(axis=0)
        mu = np.maximum(sf * np.exp(X @ beta.T), min_mu)
        dev = np.full(G, 1000.0)
        active = np.ones(G, dtype=bool)
        fallback = np.zeros(G, dtype=bool)
        it = 0
        while active.any():
            idx = np.flatnonzero(active)
            m = mu[:, idx]
            W = m / (1.0 + m * disp[:, idx])
            z = np.log(m / sf) + (Y[:, idx] - m) / m
            H = _xtwx(X, W) + ridge
            rhs = np.einsum("ni,ng->gi", X, W * z)
            bh = np.linalg.solve(H, rhs[..., None])[..., 0]
            it += 1
            bad = (np.abs(bh) > max_beta).any(axis=1) | ~np.isfinite(bh).all(axis=1)
            if it >= maxiter:
                bad[:] = True
            fallback[idx[bad]] = True
            active[idx[bad]] = False
            ok = idx[~bad]
            beta[ok] = bh[~bad]
            mu[:, ok] = np.maximum(sf * np.exp(X @ bh[~bad].T), min_mu)
            old = dev[ok]
            dev[ok] = -2 * _nb_nll(Y[:, ok], mu[:, ok], disp[:, ok])
            ratio = np.abs(dev[ok] - old) / (np.abs(dev[ok]) + 0.1)
            active[ok[ratio <= beta_tol]] = False
        converged = np.ones(G, dtype=bool)
        for i in np.flatnonzero(fallback):
            b, _, _, conv = utils.irls_solver(
                counts=Y[:, i],
                size_factors=sf[:, 0],
                design_matrix=X,
                disp=float(disp[0, i]),
                min_mu=min_mu,
                beta_tol=beta_tol,
                min_beta=min_beta,
                max_beta=max_beta,
                optimizer=optimizer,
                maxiter=maxiter,
            )
            beta[i] = b
            mu[:, i] = np.maximum(sf[:, 0] * np.exp(X @ b), min_mu)
            converged[i] = conv
        W = mu / (1.0 + mu * disp)
        Hinv = np.linalg.inv(_xtwx(X, W) + ridge)  # G,p,p
        hat = np.einsum("ni,gij,nj->ng", X, Hinv, X, optimize=True) * W
        mu_raw = sf * np.exp(X @ beta.T)
        return beta, mu_raw, hat, converged

    def wald_test(  # noqa: D102
        self,
        design_matrix: np.ndarray,
        disp: np.ndarray,
        lfc: np.ndarray,
        mu: np.ndarray,
        ridge_factor: np.ndarray,
        contrast: np.ndarray,
        lfc_null: np.ndarray,
        alt_hypothesis: Literal["greaterAbs", "lessAbs", "greater", "less"] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if alt_hypothesis is not None:
            return super().wald_test(
                design_matrix, disp, lfc, mu, ridge_factor, contrast, lfc_null, alt_hypothesis
            )
        X = np.asarray(design_matrix, float)
        mu = np.asarray(mu, float)
        lfc = np.asarray(lfc, float)
        c = np.asarray(contrast, float)
        W = mu / (1.0 + mu * np.asarray(disp, float)[None, :])
        M = _xtwx(X, W)
        H = np.linalg.inv(M + ridge_factor)
        Hc = H @ c  # G,p
        se = np.sqrt(np.einsum("gi,gij,gj->g", Hc, M, Hc))
        stat = (lfc @ c - _null(lfc_null, c)) / se
        pval = 2 * norm.sf(np.abs(stat))
        return pval, stat, se


def _null(lfc_null, c):
    """pydeseq2's two-sided statistic: contrast @ ((lfc - lfc_null) / se)."""
    return float(np.sum(np.asarray(c, float) * np.asarray(lfc_null, float)))
