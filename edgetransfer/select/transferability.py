"""Transferability of frozen features to a labelled dataset, in numpy alone.

Both estimators read one forward pass of a pretrained backbone over the train + validation images
(never the test split) and predict how well the backbone will adapt to the labels:

- `linear_probe_cv`: stratified k-fold cross-validated accuracy of a multinomial logistic regression
  on the standardised features, L2 strength chosen on a small grid by the same cross-validation.
  This is the "predicted accuracy" `select` ranks by: an accuracy a person can read.
- `logme`: LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021), the log marginal evidence of a Bayesian linear model from features
  to each class's one-hot target, maximised over the prior precision alpha and the noise precision
  beta by the paper's fixed-point iteration, divided by the number of images and averaged over the
  classes. No hyperparameters, no folds; a score, not an accuracy.

`combine_blocks` puts features of several stages side by side for both. `kendall_tau_b` and
`pareto_front` are the small pieces of ranking arithmetic `select` and its benchmark need. Nothing here imports torch or scikit-learn.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

#: the L2 strengths the linear probe tries (on mean cross-entropy + l2/2 |W|^2, standardised features)
PROBE_L2 = (1.0, 1e-1, 1e-2, 1e-3)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS on one thread while the estimators run, where threadpoolctl is installed (NNCF and
    scikit-learn bring it). Their matrices are small (hundreds of rows): a second BLAS thread gains
    nothing on them, and OpenBLAS threads that wait for a busy core (another process, torch's idle
    OpenMP workers) made the linear probe 10–50× slower on a loaded 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        raise UsageError(f"features must be (n, d) and labels (n,), got {f.shape} and {y.shape}", field="features")
    if len(f) < 2 or not np.isfinite(f).all():
        raise UsageError("features need at least two images and finite values", field="features")
    return f, y


def principal(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of f (n, d) beyond numerical rank zero, from the
    eigendecomposition of the smaller Gram matrix (f f^T or f^T f): a few matrix products and one
    small symmetric eigenproblem, several times faster than an SVD of a wide f on a small CPU."""
    n, d = f.shape
    if n <= d:
        s, u = np.linalg.eigh(f @ f.T)
    else:
        s, v = np.linalg.eigh(f.T @ f)
    keep = s > max(s.max(initial=0.0), 0.0) * max(n, d) * np.finfo(np.float64).eps * 16
    s = s[keep][::-1]
    sigma = np.sqrt(s)
    u = u[:, keep][:, ::-1] if n <= d else (f @ v[:, keep][:, ::-1]) / sigma
    return u, sigma


# -- LogME ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogME:
    """LogME of a feature matrix for a labelling: `value` is the mean over classes of
    log p(y_k | F, alpha_k, beta_k) / n at the converged alpha_k, beta_k (one per class)."""

    value: float
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    iterations: tuple[int, ...]
    converged: bool


def logme(features: np.ndarray, labels: np.ndarray, *, tol: float = 1e-6, max_iter: int = 1000) -> LogME:
    """LogME (You et al. 2021, Algorithm 1) of `features` (n, d) for integer `labels` (n,).

    For each class k the target t = 1[y == k] is modelled as t = F w + noise, w ~ N(0, I / alpha),
    noise ~ N(0, I / beta). With F = U diag(sigma) V^T (thin SVD, r = rank) and s = sigma^2 the
    eigenvalues of F^T F, the fixed point of the evidence is iterated in the eigenbasis:

        gamma = sum beta s / (alpha + beta s)             (effective number of parameters)
        m     = V diag(beta sigma / (alpha + beta s)) U^T t   (posterior mean of w)
        alpha <- gamma / m^T m,    beta <- (n - gamma) / |F m - t|^2

    until alpha / beta changes by less than `tol` (relative) or the evidence stops changing (features
    that explain nothing of t send alpha to infinity). The evidence there is

        L = d/2 log alpha + n/2 log beta - n/2 log 2 pi - beta/2 |F m - t|^2 - alpha/2 m^T m
            - 1/2 log det(alpha I + beta F^T F)

    where the d - r zero eigenvalues of F^T F contribute (d - r) log alpha to the determinant.
    """
    with _one_blas_thread():
        return _logme(*_check(features, labels), tol=tol, max_iter=max_iter)


def _logme(f: np.ndarray, y: np.ndarray, *, tol: float, max_iter: int) -> LogME:
    n, d = f.shape
    u, sigma = principal(f)
    s, r = sigma ** 2, len(sigma)
    values, alphas, betas, iterations, converged = [], [], [], [], True
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        z = u.T @ t
        outside = max(float(t @ t - z @ z), 0.0)  # the part of t no feature direction reaches
        alpha, beta = 1.0, 1.0
        value = evidence(s, z, outside, n, d, alpha, beta, rank=r)
        for it in range(1, max_iter + 1):
            denom = alpha + beta * s
            gamma = float(np.sum(beta * s / denom))
            mm = float(np.sum((beta * sigma * z / denom) ** 2))
            res = outside + float(np.sum((alpha * z / denom) ** 2))
            new_alpha = gamma / max(mm, 1e-300)
            new_beta = (n - gamma) / max(res, 1e-300)
            step = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta)
            alpha, beta = new_alpha, new_beta
            previous, value = value, evidence(s, z, outside, n, d, alpha, beta, rank=r)
            # features that explain nothing of t send alpha to infinity (w -> 0) while the evidence
            # settles at its limit: a settled evidence is convergence too
            if step < tol or abs(value - previous) < 1e-12:
                break
        else:
            converged = False
        values.append(value)
        alphas.append(alpha)
        betas.append(beta)
        iterations.append(it)
    return LogME(value=float(np.mean(values)), alpha=tuple(alphas), beta=tuple(betas),
                 iterations=tuple(iterations), converged=converged)


def evidence(s: np.ndarray, z: np.ndarray, outside: float, n: int, d: int, alpha: float, beta: float, *,
             rank: int) -> float:
    """log p(t | F, alpha, beta) / n in the eigenbasis (see `logme`): s = eigenvalues, z = U^T t."""
    denom = alpha + beta * s
    mm = float(np.sum((beta * np.sqrt(s) * z / denom) ** 2))
    res = outside + float(np.sum((alpha * z / denom) ** 2))
    logdet = float(np.sum(np.log(denom))) + (d - rank) * math.log(alpha)
    total = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
             - beta / 2 * res - alpha / 2 * mm - logdet / 2)
    return total / n


# -- the linear probe ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of the linear probe: `accuracy` at the best L2 strength of the grid."""

    accuracy: float
    l2: float
    folds: int
    samples: int
    by_l2: dict[float, float] = field(default_factory=dict)

    @property
    def standard_error(self) -> float:
        """Binomial standard error of `accuracy` over the `samples` predictions."""
        p = self.accuracy
        return math.sqrt(max(p * (1 - p), 0.0) / max(1, self.samples))


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per sample: each class's samples shuffled (seeded) and dealt round-robin, so every
    fold holds each class in proportion (fold sizes differ by at most one per class)."""
    y = np.asarray(labels)
    out = np.empty(len(y), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # the next class starts where this one stopped: folds stay balanced in size
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _objective(w: np.ndarray, x1: np.ndarray, onehot: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean cross-entropy + l2/2 |W|^2 (the bias row unpenalised) and its gradient, W of shape (d+1, C)."""
    logits = x1 @ w
    logits -= logits.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(logits).sum(axis=1))
    n = len(x1)
    loss = float(np.sum(logsum - np.sum(logits * onehot, axis=1))) / n
    grad = x1.T @ (_softmax(logits) - onehot) / n
    loss += l2 / 2 * float(np.sum(w[:-1] ** 2))
    grad[:-1] += l2 * w[:-1]
    return loss, grad


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, l2: float, *, w0: np.ndarray | None = None,
                 tol: float = 1e-4, max_iter: int = 300, memory: int = 10) -> np.ndarray:
    """Multinomial logistic regression by L-BFGS (two-loop recursion, backtracking Armijo line search).

    Minimises mean cross-entropy + l2/2 |W|^2; returns W of shape (d + 1, classes), the last row the
    bias. Stops when the largest gradient entry is below `tol`. The objective is smooth and strictly
    convex in the penalised rows, so this reaches the same optimum as any other solver.
    """
    x1 = np.hstack([x, np.ones((len(x), 1))])
    onehot = np.eye(classes)[y]
    w = np.zeros((x1.shape[1], classes)) if w0 is None else w0.copy()
    loss, grad = _objective(w, x1, onehot, l2)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(max_iter):
        if np.abs(grad).max() < tol:
            break
        q = grad.ravel().copy()
        coeffs = []
        for s_i, y_i in zip(reversed(s_hist), reversed(y_hist)):
            rho = 1.0 / float(y_i @ s_i)
            a = rho * float(s_i @ q)
            q -= a * y_i
            coeffs.append((rho, a))
        if s_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        else:
            q /= max(1.0, float(np.abs(q).max()))
        for (s_i, y_i), (rho, a) in zip(zip(s_hist, y_hist), reversed(coeffs)):
            q += s_i * (a - rho * float(y_i @ q))
        direction = -q.reshape(w.shape)
        slope = float(np.sum(direction * grad))
        if slope >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            s_hist, y_hist = [], []
            direction, slope = -grad, -float(np.sum(grad * grad))
        step = 1.0
        for _ in range(40):
            new_w = w + step * direction
            new_loss, new_grad = _objective(new_w, x1, onehot, l2)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease possible at this precision
        s_vec, y_vec = (new_w - w).ravel(), (new_grad - grad).ravel()
        if float(s_vec @ y_vec) > 1e-12:
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        w, loss, grad = new_w, new_loss, new_grad
    return w


def combine_blocks(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Feature blocks of different widths and scales (a stage's pooled output, the head's input) as
    one matrix: each block centred and scaled to unit mean row norm, then side by side.

    The probe standardises every column anyway; LogME reads raw features, where without this the
    widest or loudest block would decide the evidence alone.
    """
    out = []
    for b in blocks:
        b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
        b = b - b.mean(axis=0)
        out.append(b / max(float(np.linalg.norm(b, axis=1).mean()), 1e-12))
    return np.hstack(out).astype(np.float32)


def linear_probe_cv(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0,
                    l2_grid: tuple[float, ...] = PROBE_L2) -> ProbeResult:
    """Stratified `folds`-fold cross-validated accuracy of a multinomial logistic regression.

    Each fold standardises the features with its training part's mean and standard deviation and
    fits in the training part's principal coordinates (the same model in at most n dimensions).
    Every image is predicted once per L2 strength (the grid, strongest first, each fit warm-started
    from the previous); the strength with the highest accuracy is reported (the same protocol for
    every backbone).
    """
    with _one_blas_thread():
        return _linear_probe_cv(*_check(features, labels), folds=folds, seed=seed, l2_grid=l2_grid)


def _linear_probe_cv(f: np.ndarray, y: np.ndarray, *, folds: int, seed: int,
                     l2_grid: tuple[float, ...]) -> ProbeResult:
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UsageError("the linear probe needs at least two classes", field="labels")
    smallest = int(np.bincount(y).min())
    if smallest < 2:
        raise UsageError("every class needs at least 2 train + validation images for cross-validation",
                         field="labels")
    k = min(folds, smallest)
    fold = stratified_folds(y, k, seed)
    correct = {l2: 0 for l2 in l2_grid}
    for i in range(k):
        train, test = fold != i, fold == i
        mean, std = f[train].mean(axis=0), f[train].std(axis=0)
        std[std < 1e-12] = 1.0
        xs_train, xs_test = (f[train] - mean) / std, (f[test] - mean) / std
        # the training part's principal coordinates: with an L2 penalty the optimal weights lie in
        # the span of the training features (representer theorem), so this is the same model as on
        # all d features, fitted in at most n dimensions
        u, sigma = principal(xs_train)
        z_train, z_test = u * sigma, (xs_test @ xs_train.T) @ (u / sigma)
        w = None
        for l2 in sorted(l2_grid, reverse=True):
            w = fit_logistic(z_train, y[train], len(classes), l2, w0=w)
            pred = (np.hstack([z_test, np.ones((len(z_test), 1))]) @ w).argmax(axis=1)
            correct[l2] += int(np.sum(pred == y[test]))
    by_l2 = {l2: correct[l2] / len(y) for l2 in l2_grid}
    best = max(l2_grid, key=lambda l2: (by_l2[l2], l2))  # ties: the stronger penalty
    return ProbeResult(accuracy=by_l2[best], l2=best, folds=k, samples=len(y), by_l2=by_l2)


# -- ranking arithmetic --------------------------------------------------------------------------

def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b between two score vectors (ties in either are allowed); nan when one is constant.

    tau_b = (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)), n0 = n (n - 1) / 2.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("kendall_tau_b needs two 1-D arrays of the same length")
    i, j = np.triu_indices(len(a), k=1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    denom = math.sqrt(float(np.sum(sa != 0)) * float(np.sum(sb != 0)))
    return float(np.sum(sa * sb)) / denom if denom else float("nan")


def pareto_front(accuracy: list[float], latency: list[float | None]) -> list[bool]:
    """Which points are on the front of higher accuracy and lower latency: no other point is at
    least as accurate and at least as fast, and strictly better in one. A point without a latency
    is never on it (it cannot be compared); equal points are on it together."""
    out = []
    for i, (acc, lat) in enumerate(zip(accuracy, latency)):
        if lat is None:
            out.append(False)
            continue
        dominated = any(other is not None and a >= acc and other <= lat and (a > acc or other < lat)
                        for j, (a, other) in enumerate(zip(accuracy, latency)) if j != i)
        out.append(not dominated)
    return out
