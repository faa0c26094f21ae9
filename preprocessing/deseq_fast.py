"""A vectorised ``pydeseq2`` inference backend that reproduces the stock one.

``pydeseq2.default_inference.DefaultInference`` fits every gene separately: a scipy
L-BFGS-B call per gene for the gene-wise and the MAP dispersions, a Python IRLS loop
per gene for the GLM, a Python Wald test per gene. :class:`FastInference` runs the
*same algorithms* for all genes together, so that its results equal the stock ones
(to floating-point rounding), not merely the same model's optimum:

* ``alpha_mle``: pydeseq2's objective (NB negative log-likelihood + Cox-Reid term
  [+ log-normal prior around the trend for MAP]) and its analytic gradient, written in
  the same floating-point operations as ``pydeseq2.utils.fit_alpha_mle``, minimised by
  scipy's own L-BFGS-B routine (``scipy.optimize._lbfgsb.setulb``, the reverse-
  communication kernel that ``scipy.optimize.minimize`` drives) from the same start
  (``log alpha_hat``), with the same bounds and tolerances -- one L-BFGS-B state per
  gene, driven in lockstep, with the loss and gradient evaluated for all genes that ask
  at once. The optimiser therefore takes the same path per gene as stock pydeseq2,
  including where it stops early on the flat likelihood near ``min_disp`` (a global
  grid search would find another optimum there, and the trend, the prior variance and
  the MAP dispersions would follow it). Genes on which L-BFGS-B fails go to
  pydeseq2's ``grid_fit_alpha`` exactly as in stock.
* ``irls``: batched IRLS with pydeseq2's start, ridge, Cholesky solve
  (``scipy.linalg.solve(assume_a="pos")``, batched), deviance stopping rule and
  per-gene iteration count; a gene that diverges (|beta| > ``max_beta``) or reaches
  ``maxiter`` goes to pydeseq2's own ``irls_solver`` (its L-BFGS-B fallback).
* ``wald_test``: batched, same formula; ``lin_reg_mu``: one least-squares solve.

Everything else (size factors, trend fit, dispersion prior, Cook's distances and refit,
independent filtering, BH) is pydeseq2's own code. Written against pydeseq2 0.5.4 and
scipy 1.17 (both pinned in ``requirements/constraints.txt``); if scipy's private
L-BFGS-B kernel is not importable or callable with the expected interface,
``alpha_mle`` falls back to the stock per-gene fit (logged once).

Equivalence with stock pydeseq2 on all genes (including low-count ones) is tested in
``tests/test_analyses.py::test_fast_inference_reproduces_stock_pydeseq2_on_all_genes``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Literal

import numpy as np
import scipy.linalg
from pydeseq2 import utils
from pydeseq2.default_inference import DefaultInference
from pydeseq2.grid_search import grid_fit_alpha
from scipy.special import gammaln, polygamma
from scipy.stats import norm

log = logging.getLogger(__name__)

try:  # scipy's L-BFGS-B kernel (what scipy.optimize.minimize(method="L-BFGS-B") drives)
    from scipy.optimize import _lbfgsb
    from scipy.optimize._lbfgsb_py import _minimize_lbfgsb

    _LBFGSB_DEFAULTS = {
        k: v.default
        for k, v in inspect.signature(_minimize_lbfgsb).parameters.items()
        if k in ("maxcor", "ftol", "gtol", "maxfun", "maxiter", "maxls")
    }
    _HAVE_SETULB = hasattr(_lbfgsb, "setulb") and len(_LBFGSB_DEFAULTS) == 6
except ImportError:  # pragma: no cover - depends on the scipy build
    _HAVE_SETULB = False
    _LBFGSB_DEFAULTS = {}

_TASK_FG, _TASK_NEW_X, _TASK_CONVERGENCE = 3, 1, 4


def lbfgsb_lockstep(x0: np.ndarray, lo: float, hi: float, fun_and_grad) -> tuple:
    """Minimise many independent 1-D bounded problems with scipy's L-BFGS-B, in lockstep.

    Each problem ``i`` is run exactly as ``scipy.optimize.minimize(fun_i, [x0[i]],
    jac=..., method="L-BFGS-B", bounds=[(lo, hi)])`` would run it (same kernel, same
    defaults), but ``fun_and_grad(idx, x)`` -> ``(f, g)`` is called once per round for
    all problems ``idx`` that request an evaluation at points ``x``.

    Returns ``(x, success)``: the final points and whether each stopped with
    ``CONVERGENCE`` (scipy's ``res.success``).
    """
    d = _LBFGSB_DEFAULTS
    m, maxls = int(d["maxcor"]), int(d["maxls"])
    factr = d["ftol"] / np.finfo(float).eps
    pgtol = d["gtol"]
    G, n = len(x0), 1
    x = np.clip(np.asarray(x0, dtype=np.float64), lo, hi).reshape(G, 1).copy()
    f = np.zeros(G)
    g = np.zeros((G, 1))
    wa = np.zeros((G, 2 * m * n + 5 * n + 11 * m * m + 8 * m))
    iwa = np.zeros((G, 3 * n), dtype=np.int32)
    task = np.zeros((G, 2), dtype=np.int32)
    ln_task = np.zeros((G, 2), dtype=np.int32)
    lsave = np.zeros((G, 4), dtype=np.int32)
    isave = np.zeros((G, 44), dtype=np.int32)
    dsave = np.zeros((G, 29))
    low = np.array([lo], dtype=np.float64)
    upp = np.array([hi], dtype=np.float64)
    nbd = np.array([2], dtype=np.int32)  # both bounds
    nfev = np.zeros(G, dtype=np.int64)  # scipy's count: x0 on creation, then each new x
    nit = np.zeros(G, dtype=np.int64)
    active = np.ones(G, dtype=bool)
    setulb = _lbfgsb.setulb
    while active.any():
        want = []
        for i in np.flatnonzero(active):
            setulb(m, x[i], low, upp, nbd, f[i], g[i], factr, pgtol, wa[i], iwa[i],
                   task[i], lsave[i], isave[i], dsave[i], maxls, ln_task[i])  # fmt: skip
            t = task[i, 0]
            if t == _TASK_FG:
                want.append(i)
            elif t == _TASK_NEW_X:
                nit[i] += 1
                if nit[i] >= d["maxiter"] or nfev[i] > d["maxfun"]:
                    task[i, 0] = 5  # STOP, as scipy does
                    active[i] = False
            else:
                active[i] = False
        if want:
            w = np.asarray(want)
            fv, gv = fun_and_grad(w, x[w, 0].copy())
            f[w] = fv
            g[w, 0] = gv
            nfev[w] += 1
    return x[:, 0].copy(), task[:, 0] == _TASK_CONVERGENCE


def _xtwx(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``(X.T * W_g) @ X`` for every gene, as pydeseq2 computes it: W (G, n) -> (G, p, p)."""
    return np.matmul(X.T[None, :, :] * W[:, None, :], X)


class FastInference(DefaultInference):
    """Vectorised drop-in for :class:`pydeseq2.default_inference.DefaultInference`
    that reproduces its results gene by gene (see the module docstring)."""

    _warned = False

    def __init__(self, n_cpus: int = 1, chunk: int = 4096):
        super().__init__(n_cpus=n_cpus)
        self._chunk = chunk

    # ---------------------------------------------------------------- dispersions
    @staticmethod
    def _alpha_fg(C, M, X, log_alpha_hat, prior_disp_var, cr_reg, prior_reg):
        """Loss and gradient of ``pydeseq2.utils.fit_alpha_mle`` for rows of C/M (k, n).

        The arithmetic follows ``fit_alpha_mle``'s ``loss``/``dloss`` and
        ``utils.nb_nll``/``utils.dnb_nll`` operation by operation (sums over samples on
        contiguous rows, as numpy sums a gene's 1-D vector), so that L-BFGS-B sees the
        same numbers as in stock pydeseq2.
        """
        n = C.shape[1]

        def fg(idx, la):
            c, mu = C[idx], M[idx]
            alpha = np.exp(la)
            a1 = 1 / alpha
            a1c = a1[:, None]
            logbinom = gammaln(c + a1c) - gammaln(c + 1) - gammaln(a1c)
            nll = n * a1 * np.log(alpha) + (
                -logbinom + (c + a1c) * np.log(a1c + mu) - c * np.log(mu)
            ).sum(axis=1)
            ac = alpha[:, None]
            dnb = -(
                np.float_power(a1, 2)  # numpy scalar ** is C pow(); array ** 2 is x * x
                * (
                    polygamma(0, a1c)
                    - polygamma(0, c + a1c)
                    + np.log(1 + mu * ac)
                    + (c - mu) / (mu + a1c)
                ).sum(axis=1)
            )
            reg = np.zeros(len(idx))
            reg_grad = np.zeros(len(idx))
            if cr_reg:
                W = mu / (1 + mu * ac)
                A = _xtwx(X, W)
                reg = reg + 0.5 * np.linalg.slogdet(A)[1]
                dA = _xtwx(X, -(W**2))
                reg_grad = reg_grad + (0.5 * (np.linalg.inv(A) * dA).sum(axis=(1, 2))) * alpha
            if prior_reg:
                reg = reg + np.float_power(la - log_alpha_hat[idx], 2) / (2 * prior_disp_var)
                reg_grad = reg_grad + (la - log_alpha_hat[idx]) / prior_disp_var
            return nll + reg, alpha * dnb + reg_grad

        return fg

    def _stock_alpha_mle(self, *args):
        if not FastInference._warned and args[-1] == "L-BFGS-B":
            log.warning("FastInference: scipy's L-BFGS-B kernel unavailable; stock dispersion fit")
            FastInference._warned = True
        return super().alpha_mle(*args)

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
        if not _HAVE_SETULB or optimizer != "L-BFGS-B":
            return self._stock_alpha_mle(
                counts, design_matrix, mu, alpha_hat, min_disp, max_disp,
                prior_disp_var, cr_reg, prior_reg, optimizer,
            )  # fmt: skip
        if prior_reg and prior_disp_var is None:
            raise ValueError("Sigma_prior is required for prior regularization")
        X = np.asarray(design_matrix, dtype=float)
        C = np.ascontiguousarray(np.asarray(counts, dtype=float).T)  # G, n
        M = np.ascontiguousarray(np.asarray(mu, dtype=float).T)
        alpha_hat = np.asarray(alpha_hat, dtype=float)
        G = C.shape[0]
        out = np.empty(G)
        success = np.empty(G, dtype=bool)
        lo, hi = float(np.log(min_disp)), float(np.log(max_disp))
        for s in range(0, G, self._chunk):
            sl = slice(s, min(G, s + self._chunk))
            lah = np.log(alpha_hat[sl])
            fg = self._alpha_fg(C[sl], M[sl], X, lah, prior_disp_var, cr_reg, prior_reg)
            try:
                x, ok = lbfgsb_lockstep(lah, lo, hi, fg)
            except TypeError:  # setulb's interface changed: a scipy other than 1.17
                return self._stock_alpha_mle(
                    counts, design_matrix, mu, alpha_hat, min_disp, max_disp,
                    prior_disp_var, cr_reg, prior_reg, optimizer,
                )  # fmt: skip
            out[sl] = np.exp(x)
            success[sl] = ok
        for i in np.flatnonzero(~success):  # stock: grid search when L-BFGS-B fails
            out[i] = np.exp(
                grid_fit_alpha(
                    np.asarray(counts)[:, i],
                    X,
                    np.asarray(mu)[:, i],
                    alpha_hat[i],
                    min_disp,
                    max_disp,
                )
            )
        return out, success

    # ---------------------------------------------------------------- GLM
    def lin_reg_mu(  # noqa: D102
        self,
        counts: np.ndarray,
        size_factors: np.ndarray,
        design_matrix: np.ndarray,
        min_mu: float,
    ) -> np.ndarray:
        # sklearn's LinearRegression(fit_intercept=False) per gene, as pydeseq2's
        # fit_lin_mu: scipy.linalg.lstsq(cond=1e-6) one gene at a time (LAPACK's result
        # for several right-hand sides differs in the last bits), prediction X @ coef
        X = np.asarray(design_matrix, float)
        sf = np.asarray(size_factors, float)
        Y = np.asarray(counts, float) / sf[:, None]
        coef = np.stack([scipy.linalg.lstsq(X, Y[:, i], cond=1e-6)[0] for i in range(Y.shape[1])])
        pred = np.matmul(X, coef[:, :, None])[:, :, 0] + 0.0  # G, n
        return np.maximum(sf * pred, min_mu).T

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
        Y = np.ascontiguousarray(np.asarray(counts, float).T)  # G, n
        X = np.asarray(design_matrix, float)
        sf = np.asarray(size_factors, float)  # n
        disp = np.asarray(disp, float)  # G
        n, p = X.shape
        G = Y.shape[0]
        ridge = np.diag(np.repeat(1e-6, p))
        if np.linalg.matrix_rank(X) == p:
            Q, R = np.linalg.qr(X)
            y = np.log(Y / sf + 0.1)  # G, n
            # stacked (per-gene) products and solves: the same BLAS/LAPACK calls per gene
            qty = np.matmul(Q.T, y[:, :, None])
            beta = scipy.linalg.solve(np.broadcast_to(R, (G, p, p)), qty)[:, :, 0].copy()
        else:
            beta = np.zeros((G, p))
            beta[:, 0] = np.log(Y / sf).mean(axis=1)
        mu = np.maximum(sf * np.exp(beta @ X.T), min_mu)  # G, n
        dev = np.full(G, 1000.0)
        active = np.ones(G, dtype=bool)
        fallback = np.zeros(G, dtype=bool)
        it = 0
        while active.any():
            idx = np.flatnonzero(active)
            m = mu[idx]
            d = disp[idx, None]
            W = m / (1.0 + m * d)
            z = np.log(m / sf) + (Y[idx] - m) / m
            H = _xtwx(X, W) + ridge
            rhs = np.matmul(X.T, (W * z)[:, :, None])[:, :, 0]
            bh = scipy.linalg.solve(H, rhs[:, :, None], assume_a="pos")[:, :, 0]
            it += 1
            bad = (np.abs(bh) > max_beta).any(axis=1)
            if it >= maxiter:
                bad[:] = True
            fallback[idx[bad]] = True
            active[idx[bad]] = False
            ok = idx[~bad]
            beta[ok] = bh[~bad]
            mu[ok] = np.maximum(sf * np.exp(bh[~bad] @ X.T), min_mu)
            old = dev[ok]
            mo, yo, do = mu[ok], Y[ok], disp[ok, None]
            a1 = 1 / do
            logbinom = gammaln(yo + a1) - gammaln(yo + 1) - gammaln(a1)
            nll = n * a1[:, 0] * np.log(do[:, 0]) + (
                -logbinom + (yo + a1) * np.log(a1 + mo) - yo * np.log(mo)
            ).sum(axis=1)
            dev[ok] = -2 * nll
            ratio = np.abs(dev[ok] - old) / (np.abs(dev[ok]) + 0.1)
            active[ok[~(ratio > beta_tol)]] = False
        converged = np.ones(G, dtype=bool)
        for i in np.flatnonzero(fallback):
            b, _, _, conv = utils.irls_solver(
                counts=np.asarray(counts)[:, i],
                size_factors=sf,
                design_matrix=X,
                disp=float(disp[i]),
                min_mu=min_mu,
                beta_tol=beta_tol,
                min_beta=min_beta,
                max_beta=max_beta,
                optimizer=optimizer,
                maxiter=maxiter,
            )
            beta[i] = b
            mu[i] = np.maximum(sf * np.exp(X @ b), min_mu)
            converged[i] = conv
        W = mu / (1.0 + mu * disp[:, None])
        Hinv = np.linalg.inv(_xtwx(X, W) + ridge)  # G, p, p
        h = np.einsum("ij,gjk,ki->gi", X, Hinv, X.T)
        Wsq = np.sqrt(W)
        hat = Wsq * h * Wsq
        mu_raw = sf * np.exp(beta @ X.T)
        return beta, mu_raw.T, hat.T, converged

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
        mu = np.ascontiguousarray(np.asarray(mu, float).T)  # G, n
        lfc = np.asarray(lfc, float)
        c = np.asarray(contrast, float)
        W = mu / (1 + mu * np.asarray(disp, float)[:, None])
        M = _xtwx(X, W)
        H = np.linalg.inv(M + ridge_factor)
        Hc = np.matmul(H, c)  # G, p
        # Hc.T @ M @ Hc and contrast @ (lfc - lfc_null) per gene, as stacked products
        # (the same BLAS calls as pydeseq2's per-gene wald_test)
        se = np.sqrt(np.matmul(np.matmul(Hc[:, None, :], M), Hc[:, :, None])[:, 0, 0])
        diff = lfc - np.asarray(lfc_null, float)
        stat = np.matmul(diff[:, None, :], c[:, None])[:, 0, 0] / se
        pval = 2 * norm.sf(np.abs(stat))
        return pval, stat, se
