"""Stage III: Bayesian refinement with a Gaussian process.

The GP has a Matérn-5/2 kernel with one length-scale per dimension (ARD), a signal
variance and a noise variance, all fitted by maximising the log marginal likelihood
(scipy's L-BFGS-B on their logarithms, several seeded restarts). Its inputs are the
normalised gene indices, its target the log of the cheap quality (KL spans decades).

Each step proposes neighbours of the best evaluated allocations (one to three genes moved
one choice up or down), keeps only those inside the budget — costs are exact, so the
constraint is known, not modelled: expected improvement under the constraint is EI times
an indicator of feasibility — and evaluates the one with the highest EI for real.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import minimize
from scipy.stats import norm

from .genes import GeneSpace, GroupConfig

_SQRT5 = math.sqrt(5.0)


def matern52(X1: np.ndarray, X2: np.ndarray, lengthscales: np.ndarray, variance: float) -> np.ndarray:
    d = np.sqrt(np.maximum(((X1[:, None, :] - X2[None, :, :]) / lengthscales) ** 2, 0).sum(-1))
    return variance * (1.0 + _SQRT5 * d + 5.0 / 3.0 * d * d) * np.exp(-_SQRT5 * d)


class GaussianProcess:
    def __init__(self, restarts: int = 2, seed: int = 0):
        self.restarts, self.seed = restarts, seed

    def _nll(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray):
        """Negative log marginal likelihood and its exact gradient in ``theta``
        (log length-scales, log signal variance, log noise variance)."""
        ls, var, noise = np.exp(theta[:-2]), math.exp(theta[-2]), math.exp(theta[-1])
        n = len(X)
        diff2 = ((X[:, None, :] - X[None, :, :]) / ls) ** 2  # [n, n, d]
        r = np.sqrt(diff2.sum(-1))
        e = np.exp(-_SQRT5 * r)
        Kf = var * (1.0 + _SQRT5 * r + 5.0 / 3.0 * r * r) * e
        K = Kf + (noise + 1e-8) * np.eye(n)
        try:
            c = cho_factor(K, lower=True)
        except np.linalg.LinAlgError:
            return 1e25, np.zeros_like(theta)
        alpha = cho_solve(c, y)
        nll = 0.5 * y @ alpha + np.log(np.diag(c[0])).sum() + 0.5 * n * math.log(2 * math.pi)
        W = cho_solve(c, np.eye(n)) - np.outer(alpha, alpha)  # d nll = ½ tr(W dK)
        # dk/dlog l_d = var·(5/3)·(1 + √5 r)·exp(-√5 r)·(Δ_d / l_d)²
        g_ls = 0.5 * np.einsum("ij,ijd->d", W * (var * 5.0 / 3.0 * (1.0 + _SQRT5 * r) * e), diff2)
        grad = np.concatenate([g_ls, [0.5 * (W * Kf).sum(), 0.5 * noise * np.trace(W)]])
        return float(nll), grad

    def fit(self, X: np.ndarray, y: np.ndarray) -> "GaussianProcess":
        X = np.asarray(X, float)
        y = np.asarray(y, float)
        self.mean, self.std = float(y.mean()), float(y.std() or 1.0)
        self.X, self.y = X, (y - self.mean) / self.std
        d = X.shape[1]
        rng = np.random.default_rng(self.seed)
        bounds = [(math.log(1e-2), math.log(1e2))] * d + [(math.log(1e-2), math.log(1e2)),
                                                          (math.log(1e-6), math.log(1.0))]
        best = None
        for i in range(self.restarts):
            theta0 = np.concatenate([np.full(d, math.log(0.5 if i == 0 else rng.uniform(0.2, 3.0))),
                                     [0.0, math.log(1e-2)]])
            res = minimize(self._nll, theta0, args=(self.X, self.y), jac=True,
                           method="L-BFGS-B", bounds=bounds, options={"maxiter": 50})
            if best is None or res.fun < best.fun:
                best = res
        self.theta = best.x
        self.lengthscales = np.exp(best.x[:-2])
        self.variance, self.noise = math.exp(best.x[-2]), math.exp(best.x[-1])
        K = matern52(self.X, self.X, self.lengthscales, self.variance) + \
            (self.noise + 1e-8) * np.eye(len(self.X))
        self._c = cho_factor(K, lower=True)
        self._alpha = cho_solve(self._c, self.y)
        return self

    def predict(self, Xs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation, in the original units of ``y``."""
        Ks = matern52(np.asarray(Xs, float), self.X, self.lengthscales, self.variance)
        mu = Ks @ self._alpha
        v = cho_solve(self._c, Ks.T)
        var = np.maximum(self.variance - (Ks * v.T).sum(1), 1e-12)
        return mu * self.std + self.mean, np.sqrt(var) * self.std


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, best: float) -> np.ndarray:
    """EI for minimisation."""
    sigma = np.maximum(sigma, 1e-12)
    z = (best - mu) / sigma
    return (best - mu) * norm.cdf(z) + sigma * norm.pdf(z)


def neighbours(space: GeneSpace, cfg: GroupConfig, rng: np.random.Generator, n: int) -> List[GroupConfig]:
    out = []
    for _ in range(n):
        c = dict(cfg)
        for _ in range(int(rng.integers(1, 4))):
            g = space.names[int(rng.integers(len(space.names)))]
            b, r = c[g]
            if rng.random() < 0.5:
                i = space.bits.index(b) + int(rng.choice([-1, 1]))
                if 0 <= i < len(space.bits):
                    c[g] = (space.bits[i], r)
            else:
                i = space.ranks.index(r) + int(rng.choice([-1, 1]))
                if 0 <= i < len(space.ranks):
                    c[g] = (b, space.ranks[i])
        out.append(c)
    return out


def refine(space: GeneSpace, history: Sequence[Tuple[GroupConfig, float]],
           score: Callable[[GroupConfig], float], steps: int, seed: int,
           candidates: int = 256, progress: bool = True) -> List[GroupConfig]:
    """``steps`` rounds of fit → propose → maximise EI → evaluate. ``history``: the
    (allocation, cheap quality) pairs evaluated so far (any budget). Returns the new ones."""
    rng = np.random.default_rng(seed)
    hist = {space.key(c): (c, q) for c, q in history}
    new: List[GroupConfig] = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="GP refinement", unit="step")
    for step in it:
        pts = list(hist.values())
        X = np.stack([space.features(c) for c, _ in pts])
        y = np.log(np.maximum([q for _, q in pts], 1e-12))
        gp = GaussianProcess(seed=seed + step).fit(X, y)
        feasible = [(c, v) for c, v in zip((c for c, _ in pts), y) if space.feasible(c)]
        if not feasible:
            break
        feasible.sort(key=lambda t: t[1])
        best_y = feasible[0][1]
        pool = {}
        for c, _ in feasible[:5]:
            for nb in neighbours(space, c, rng, candidates // 5):
                if not space.feasible(nb):
                    nb = space.repair(nb)
                k = space.key(nb)
                if k not in hist:
                    pool[k] = nb
        if not pool:
            break
        cands = list(pool.values())
        mu, sd = gp.predict(np.stack([space.features(c) for c in cands]))
        ei = expected_improvement(mu, sd, best_y)
        pick = cands[int(np.argmax(ei))]
        q = float(score(pick))
        hist[space.key(pick)] = (pick, q)
        new.append(pick)
    return new
