"""Pure tensor math for the LoRA initializations (no model or peft knowledge).

Conventions: W, Q and E = W - Q are (m x n) = (out x in); H = X X^T / N is the (n x n) symmetric PSD
second moment of the layer's inputs; a correction C = P @ Rt is kept as low-rank factors P (m x r),
Rt (r x n) and only split into peft's A (r x n), B (m x r) with s * B @ A == C at the end.

Precision: on CPU every computation runs in float64 (cheap at these sizes and accurate to ~1e-12);
on other devices the big products and SVDs run in float32 for speed and memory, while the
factorizations of H (Cholesky, eigh) and the small r x r solves always run in float64 and are cast back.
Every function returns factors in the dtype of that working precision, except `split_factors`,
which returns float32 (what the LoRA layers hold).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quailora_app.errors import ConfigError

#: closed_form's solvers: exact (Cholesky + truncated SVD) or randomized (subspace iteration).
SOLVERS = ("exact", "randomized")

__all__ = [
    "DampedH",
    "damped",
    "svd_correction",
    "closed_form_correction",
    "SOLVERS",
    "quailora_correction",
    "split_factors",
    "weight_error",
    "calibrated_error",
    "calibrated_objective",
    "LowRankErrors",
    "check_rank",
]


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU, float32 elsewhere (see the module docstring)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _work(t: Tensor) -> Tensor:
    return t.to(_work_dtype(t.device))


def _cholesky(M: Tensor) -> Tensor:
    """Cholesky factor of a symmetric PD matrix, in float64. If round-off makes it fail (damping 0 on a
    singular H), a jitter of 1e-12, 1e-10, ... times the mean diagonal is added until it succeeds."""
    M64 = M.to(torch.float64)  # symmetric already (damped() symmetrizes); cholesky reads the lower triangle only
    L, info = torch.linalg.cholesky_ex(M64)
    scale = float(M64.diagonal().mean().abs()) or 1.0
    jitter = 1e-12
    while int(info) != 0:
        if jitter > 1e-2:
            raise ValueError("H + lambda I is not positive definite even with jitter")
        eye = torch.eye(M64.shape[0], dtype=M64.dtype, device=M64.device)
        L, info = torch.linalg.cholesky_ex(M64 + jitter * scale * eye)
        jitter *= 100
    return L


@dataclass
class DampedH:
    """H + lambda I for the calibrated methods, with its Cholesky factor L L^T = H + lambda I.

    What the engine uses per distinct layer input: ALS only needs products (H + lambda I) R, and the closed
    form needs any square root of H + lambda I; a Cholesky factorization (n^3 / 3 flops) gives one several
    times faster than an eigen-decomposition. `cholesky()` is cached after its first call.
    """

    matrix: Tensor  # (n, n) H + lambda I in the working precision
    damping_lambda: float
    _chol: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def apply(self, R: Tensor) -> Tensor:
        """(H + lambda I) @ R."""
        return self.matrix @ R.to(self.matrix.dtype)

    def damped(self) -> Tensor:
        return self.matrix

    def cholesky(self) -> Tensor:
        if self._chol is None:
            self._chol = _cholesky(self.matrix).to(self.matrix.dtype)
        return self._chol


def _symmetric64(H: Tensor, damping: float) -> tuple[Tensor, float]:
    """(H symmetrized in float64, lambda = damping * mean(diag H), or damping itself if H is all zero)."""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    H64 = H.to(torch.float64)
    H64 = (H64 + H64.T) / 2
    mean_diag = float(H64.diagonal().mean())
    return H64, (damping * mean_diag if mean_diag > 0 else float(damping))


def damped(H: Tensor, damping: float = 0.01) -> DampedH:
    """H + lambda I with lambda = damping * mean(diag(H)) (lambda = damping if H is all zero), symmetrized."""
    H64, lam = _symmetric64(H, damping)
    H64.diagonal().add_(lam)
    return DampedH(H64.to(_work_dtype(H.device)), lam)


class _LastGram(threading.local):
    """The Gram eigen-decomposition of the last matrix `_truncated_svd` saw, while that matrix lives.

    svd and quailora both start from the truncated SVD of the same E (one tensor per layer, shared by the methods,
    calibration/initialize.py): the eigh, most of either's cost on CPU, then runs once per layer instead of once per
    method. Keyed on the tensor object itself (a weak reference and its in-place version counter), never on its
    address, and cleared when the tensor is freed, so a later matrix can never read a stale result."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version = -1
        self.value: tuple[Tensor, Tensor] | None = None

    def get(self, M: Tensor) -> tuple[Tensor, Tensor] | None:
        hit = self.ref is not None and self.ref() is M and self.version == M._version
        return self.value if hit else None

    def put(self, M: Tensor, value: tuple[Tensor, Tensor]) -> None:
        self.ref, self.version, self.value = weakref.ref(M), M._version, value
        weakref.finalize(M, self._forget, self.ref)

    def _forget(self, ref: weakref.ref) -> None:
        if self.ref is ref:
            self.ref, self.value = None, None


_last_gram = _LastGram()


def _gram_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues ascending, eigenvectors) of the smaller Gram matrix of M (M^T M if tall, else M M^T), float64;
    the last matrix's result is reused (see _LastGram)."""
    cached = _last_gram.get(M)
    if cached is not None:
        return cached
    M64 = M.to(torch.float64)
    gram = M64.T @ M64 if M64.shape[0] >= M64.shape[1] else M64 @ M64.T
    value = torch.linalg.eigh((gram + gram.T) / 2)
    _last_gram.put(M, value)
    return value


def _truncated_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets of M through the eigen-decomposition of its smaller Gram matrix.

    With n <= m: M^T M = V diag(S^2) V^T, then U = M V / S (and symmetrically for m < n). One eigh of a
    min(m, n)-square matrix is several times faster than a full SVD on CPU; it is computed in float64, so the
    squared condition number costs nothing for the leading triplets that a rank-r correction keeps.
    Pads with zero singular triplets if rank > min(m, n)."""
    w, vecs = _gram_eigh(M)
    M64 = M.to(torch.float64)
    tall = M64.shape[0] >= M64.shape[1]
    k = min(rank, w.numel())
    w, vecs = w.flip(0)[:k].clamp(min=0.0), vecs.flip(1)[:, :k]
    S = w.sqrt()
    tiny = float(S[0]) * 1e-12 if k else 0.0
    inv = torch.where(S > tiny, 1.0 / S.clamp(min=1e-300), torch.zeros_like(S))
    if tall:
        V = vecs
        U = (M64 @ V) * inv
    else:
        U = vecs
        V = (M64.T @ U) * inv
    U, S, Vh = U.to(M.dtype), S.to(M.dtype), V.T.to(M.dtype)
    if k < rank:
        U = torch.cat([U, U.new_zeros(U.shape[0], rank - k)], dim=1)
        S = torch.cat([S, S.new_zeros(rank - k)])
        Vh = torch.cat([Vh, Vh.new_zeros(rank - k, Vh.shape[1])], dim=0)
    return U, S, Vh


def svd_correction(E: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation of E in Frobenius norm (Eckart-Young): E ~ U_r S_r V_r^T.

    Returns balanced factors P = U_r sqrt(S_r) (m x r), Rt = sqrt(S_r) V_r^T (r x n).
    """
    U, S, Vh = _truncated_svd(_work(E), rank)
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def closed_form_correction(
    E: Tensor, h: DampedH, rank: int, solver: str = "exact", power_iters: int = 6, oversample: int = 16,
    EHd: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimizer of tr((E - C)(H + lambda I)(E - C)^T) over rank-r C (H + lambda I written Hd below).

    exact: with Hd = L L^T (Cholesky; any square root works) the objective is ||(E - C) L||_F^2 and L is
    invertible, so C L ranges over all rank-r matrices: C L = SVD_r(E L) = U_r S_r W_r^T, i.e.
    P = U_r sqrt(S_r), Rt = sqrt(S_r) W_r^T L^-1 (one triangular solve, no inverse formed). Cost m n^2 + n^3/3.
    Equivalently C = U_r U_r^T E, with U_r the top-r eigenvectors of E Hd E^T: for m <= n that m x m route is
    taken (no factorization of Hd at all).
    randomized: the same optimum is C = U_r U_r^T E with U_r the top-r eigenvectors of G = E Hd E^T (m x m).
    Subspace iteration finds them from products with E, E^T and Hd only (k = r + oversample columns,
    `power_iters` rounds of Y <- E Hd E^T Y, then Rayleigh-Ritz on span(Y)): cost (2 m n k + n^2 k) per round,
    no factorization of Hd. Seeded, so it is deterministic. Its objective is measured against exact's in
    bench/scale.py.
    `EHd`: E Hd if the caller already has it (LowRankErrors forms it for the error report); the m <= n route
    then skips its m n^2 product.
    """
    if solver == "randomized":
        return _closed_form_randomized(E, h, rank, power_iters, oversample)
    if solver != "exact":
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    if E.shape[0] <= E.shape[1]:
        return _closed_form_wide(E, h, rank, EHd)
    L = h.cholesky()
    M = E.to(L.dtype) @ L
    U, S, Wh = _truncated_svd(M, rank)
    root = S.sqrt()
    # Rt = root W^T L^-1  <=>  L^T Rt^T = W root
    Rt = torch.linalg.solve_triangular(L.T, (Wh.T * root).to(L.dtype), upper=True).T
    return U * root, Rt.contiguous()


def _closed_form_wide(E: Tensor, h: DampedH, rank: int, EHd: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """closed_form for m <= n without factorizing Hd: C = U_r U_r^T E with U_r the top-r eigenvectors of the
    m x m matrix G = E Hd E^T (= (E L)(E L)^T, whose top left singular vectors the Cholesky route finds).
    Cost m n^2 + m^2 n + eigh(m): no n^3 Cholesky and no triangular solve."""
    Ew = _work(E)
    G = (EHd.to(Ew.dtype) @ Ew.T) if EHd is not None else Ew @ h.apply(Ew.T).to(Ew.dtype)  # (m x m), E Hd E^T
    G64 = G.to(torch.float64)
    w, V = torch.linalg.eigh((G64 + G64.T) / 2)
    k = min(rank, w.numel())
    U = V.flip(1)[:, :k].to(Ew.dtype)
    Rt = U.T @ Ew
    if k < rank:
        U = torch.cat([U, U.new_zeros(U.shape[0], rank - k)], dim=1)
        Rt = torch.cat([Rt, Rt.new_zeros(rank - k, Rt.shape[1])], dim=0)
    return U, Rt.contiguous()


def _closed_form_randomized(E: Tensor, h: DampedH, rank: int, power_iters: int, oversample: int):
    Ew = _work(E)
    m, n = Ew.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=Ew.device).manual_seed(0)
    omega = torch.randn(n, k, generator=gen, dtype=Ew.dtype, device=Ew.device)
    Y = Ew @ h.apply(omega).to(Ew.dtype)
    for _ in range(power_iters):
        Q, _unused = torch.linalg.qr(Y)
        Y = Ew @ h.apply(Ew.T @ Q).to(Ew.dtype)
    Q, _unused = torch.linalg.qr(Y)  # (m x k), spans the top of G's range
    B = Ew.T @ Q  # (n x k)
    T = B.T @ h.apply(B).to(Ew.dtype)  # Q^T G Q (k x k)
    _w, V = torch.linalg.eigh(((T + T.T) / 2).to(torch.float64))
    U = Q @ V.flip(1)[:, :rank].to(Ew.dtype)  # (m x min(r, k))
    Rt = U.T @ Ew
    if U.shape[1] < rank:  # rank > min(m, n): pad with zero directions, as _truncated_svd does
        U = torch.cat([U, U.new_zeros(m, rank - U.shape[1])], dim=1)
        Rt = torch.cat([Rt, Rt.new_zeros(rank - Rt.shape[0], n)], dim=0)
    return U, Rt.contiguous()


def _psd_solve(G: Tensor, rhs: Tensor) -> Tensor:
    """Solve G X = rhs for a symmetric PSD (r x r) G, in float64.

    A Cholesky solve when G is well conditioned (the usual case, and fast); otherwise the pseudo-inverse
    through eigh, dropping directions with eigenvalue below r * eps * max eigenvalue, which gives the
    minimum-norm least-squares solution when G is rank-deficient.
    """
    G64 = G.to(torch.float64)
    G64 = (G64 + G64.T) / 2
    rhs64 = rhs.to(torch.float64)
    diag = G64.diagonal()
    if G64.shape[0] and float(diag.min()) > 1e-8 * float(diag.max()):
        L, info = torch.linalg.cholesky_ex(G64)
        if int(info) == 0:
            return torch.cholesky_solve(rhs64, L).to(rhs.dtype)
    w, V = torch.linalg.eigh(G64)
    tol = max(G.shape[0], 1) * torch.finfo(torch.float64).eps * float(w.abs().max().clamp(min=0.0))
    inv = torch.where(w > tol, 1.0 / w.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(w))
    return ((V * inv) @ (V.T @ rhs64)).to(rhs.dtype)


def quailora_correction(E: Tensor, spec: DampedH, rank: int, rounds: int = 20) -> tuple[Tensor, Tensor]:
    """The paper's alternating least squares for min tr((E - C) Hd (E - C)^T), C = P R^T, Hd = H + lambda I.

    Starts from the truncated SVD of E (R = V_r), then `rounds` times:
        P   <- E Hd R (R^T Hd R)^-1     (optimal P for fixed R)
        R^T <- (P^T P)^-1 P^T E         (optimal R for fixed P)
    Both updates depend only on the column space of the fixed factor, so R is re-orthonormalized (QR)
    before each P step; this changes no iterate C, only the conditioning. The r x r systems are
    solved in float64 through a pseudo-inverse, so rank-deficient factors are safe. The objective
    never increases. Returns (P (m x r), Rt (r x n)).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    Ew = _work(E)
    U, S, Vh = _truncated_svd(Ew, rank)
    if rounds == 0:
        root = S.sqrt()
        return U * root, root[:, None] * Vh
    R = Vh.T  # (n x r)
    P = U * S
    for _ in range(rounds):
        R, _unused = torch.linalg.qr(R)
        HR = spec.apply(R)  # (n x r)
        P = _psd_solve(R.T @ HR, (Ew @ HR).T).T  # P = E Hd R (R^T Hd R)^-1, (m x r)
        R = _psd_solve(P.T @ P, P.T @ Ew).T  # R^T = (P^T P)^-1 P^T E, (n x r)
    return P, R.T.contiguous()


def split_factors(P: Tensor, Rt: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Split C = P @ Rt into peft's factors A (r x n), B (m x r) with scaling * B @ A == C.

    Without forming C: P = Q_p R_p, Rt^T = Q_r R_r (QR), K = R_p R_r^T = u S v^T (small SVD), so
    C = U S V^T with U = Q_p u, V = Q_r v. Then B = U sqrt(S) / sqrt(s), A = sqrt(S) V^T / sqrt(s).
    If C has rank < r, the missing singular values are zero: those columns of B are zero (so the
    product is unchanged) while the matching rows of A are orthonormal directions at the typical
    scale of A's other rows, so that LoRA can still learn them (a zero row in both would never
    receive a gradient). Returns float32 contiguous tensors.
    """
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    if P.ndim != 2 or Rt.ndim != 2 or P.shape[1] != Rt.shape[0]:
        raise ValueError(f"factor shapes do not match: P {tuple(P.shape)}, Rt {tuple(Rt.shape)}")
    m, r = P.shape
    n = Rt.shape[1]
    P64 = P.to(torch.float64)
    R64 = Rt.to(torch.float64).T  # (n x r)
    Qp, Rp = torch.linalg.qr(P64)  # Qp (m x kp), kp = min(m, r)
    Qr, Rr = torch.linalg.qr(R64)  # Qr (n x kr), kr = min(n, r)
    K = Rp @ Rr.T  # (kp x kr)
    u, S, vh = torch.linalg.svd(K, full_matrices=True)
    U = Qp @ u  # (m x kp), orthonormal columns
    V = Qr @ vh.T  # (n x kr), orthonormal columns
    # Bring everything to r columns: singular values beyond min(kp, kr) are zero.
    S = torch.cat([S, S.new_zeros(r - S.numel())])
    U = torch.cat([U, U.new_zeros(m, r - U.shape[1])], dim=1)
    if V.shape[1] < r:  # only when r > n: no further orthonormal directions exist
        V = torch.cat([V, V.new_zeros(n, r - V.shape[1])], dim=1)
    top = float(S.max()) if S.numel() else 0.0
    live = S > max(m, n, r) * torch.finfo(torch.float64).eps * top if top > 0 else torch.zeros_like(S, dtype=torch.bool)
    root = torch.where(live, S.sqrt(), torch.zeros_like(S))
    pad = float(root[live].pow(2).mean().sqrt()) if bool(live.any()) else 1.0
    a_scale = torch.where(live, root, torch.full_like(root, pad))
    inv_s = 1.0 / float(scaling) ** 0.5
    B = (U * root) * inv_s
    A = (a_scale[:, None] * V.T) * inv_s
    return A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous()


def calibrated_objective(E: Tensor, C: Tensor, H: Tensor) -> float:
    """tr((E - C) H (E - C)^T) = sum((D H) * D) with D = E - C."""
    D = _work(E) - C.to(_work_dtype(E.device))
    Hw = H.to(D.dtype)
    return float(((D @ Hw) * D).sum())


class LowRankErrors:
    """Weight and calibrated errors of several rank-r corrections C = P Rt of one E, without forming E - C.

    E Hd (m n^2 flops) is formed once, with Hd = H + lambda I the damped H the corrections use (no second n x n
    copy of H); then per correction only products with the r-row factor:
        ||E - C||_F^2              = ||E||_F^2    - 2 sum(P * (E Rt^T))    + sum((P^T P) * (Rt Rt^T))
        tr((E - C) Hd (E - C)^T)   = tr(E Hd E^T) - 2 sum(P * (E Hd Rt^T)) + sum((P^T P) * (Rt Hd Rt^T))
        tr((E - C) H (E - C)^T)    = tr((E - C) Hd (E - C)^T) - lambda ||E - C||_F^2
    Same figures as weight_error / calibrated_error (to round-off), about 1 + 2r/n products instead of 2 per
    correction, which made the error report cost more than the corrections themselves."""

    def __init__(self, E: Tensor, h: DampedH):
        self.E = _work(E)
        self.h = h
        self.EH = self.E @ h.matrix.to(self.E.dtype)
        self.weight_base = float((self.E * self.E).sum())
        self.calib_base = float((self.EH * self.E).sum()) - h.damping_lambda * self.weight_base

    def errors(self, P: Tensor, Rt: Tensor) -> tuple[float, float]:
        """(weight error, calibrated error) of C = P @ Rt, as fractions of C = 0's."""
        P, Rt = P.to(self.E.dtype), Rt.to(self.E.dtype)
        gram = P.T @ P
        weight = self.weight_base - 2 * float((P * (self.E @ Rt.T)).sum()) + float((gram * (Rt @ Rt.T)).sum())
        damped = (self.calib_base + self.h.damping_lambda * self.weight_base - 2 * float((P * (self.EH @ Rt.T)).sum())
                  + float((gram * (Rt @ self.h.apply(Rt.T).to(Rt.dtype))).sum()))
        calib = damped - self.h.damping_lambda * weight
        w = max(weight, 0.0) ** 0.5 / self.weight_base**0.5 if self.weight_base > 0 else 0.0
        c = max(calib, 0.0) ** 0.5 / self.calib_base**0.5 if self.calib_base > 0 else 0.0
        return w, c

    def errors_by_rank(self, P: Tensor, Rt: Tensor) -> tuple[Tensor, Tensor]:
        """(weight errors, calibrated errors), float64 tensors of K + 1 entries: those of every nested correction
        C_k = P[:, :k] @ Rt[:k] for k = 0..K (k = 0: C = 0, i.e. 1.0), as fractions of C = 0's, as errors() gives.

        With P_k, Rt_k the leading k columns / rows, each term is a prefix sum over K x K matrices:
            ||E - C_k||_F^2 = ||E||_F^2 - 2 sum_{i<k} (P^T E Rt^T)_ii + sum_{i,j<k} (P^T P)_ij (Rt Rt^T)_ij
        and the same with Hd (E Hd Rt^T, Rt Hd Rt^T); the diagonal terms are cumulative sums, the double sums the
        diagonal of a 2-D cumulative sum. O(m n K + n^2 K) once, O(K^2) for all the ranks together."""
        P, Rt = P.to(self.E.dtype), Rt.to(self.E.dtype)
        gram = P.T @ P
        lam = self.h.damping_lambda
        zero = P.new_zeros(1)

        def prefix(cross: Tensor, quad: Tensor) -> Tensor:
            diag = cross.cumsum(0)
            double = quad.cumsum(0).cumsum(1).diagonal()
            return torch.cat([zero, -2 * diag + double]).to(torch.float64)

        weight = self.weight_base + prefix((P * (self.E @ Rt.T)).sum(0), gram * (Rt @ Rt.T))
        damped = (self.calib_base + lam * self.weight_base
                  + prefix((P * (self.EH @ Rt.T)).sum(0), gram * (Rt @ self.h.apply(Rt.T).to(Rt.dtype))))
        calib = damped - lam * weight
        w = (weight.clamp(min=0.0) / self.weight_base).sqrt() if self.weight_base > 0 else torch.zeros_like(weight)
        c = (calib.clamp(min=0.0) / self.calib_base).sqrt() if self.calib_base > 0 else torch.zeros_like(calib)
        return w, c


def weight_error(E: Tensor, C: Tensor) -> float:
    """||E - C||_F / ||E||_F (1.0 for C = 0; 0.0 when E = 0)."""
    Ew = _work(E)
    denom = float(torch.linalg.matrix_norm(Ew))
    if denom == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(Ew - C.to(Ew.dtype))) / denom


def calibrated_error(E: Tensor, C: Tensor, H: Tensor) -> float:
    """sqrt(tr((E - C) H (E - C)^T) / tr(E H E^T)) with the undamped H (1.0 for C = 0; 0.0 when E H E^T = 0)."""
    denom = calibrated_objective(E, torch.zeros_like(E), H)
    if denom <= 0.0:
        return 0.0
    return max(calibrated_objective(E, C, H), 0.0) ** 0.5 / denom**0.5


def check_rank(rank: int, shape: tuple[int, int], name: str) -> None:
    """Raise ConfigError when the LoRA rank exceeds min(out, in) of the (out x in) layer `name`."""
    m, n = int(shape[0]), int(shape[1])
    if rank < 1:
        raise ConfigError(f"rank must be at least 1, got {rank} (layer {name})")
    if rank > min(m, n):
        raise ConfigError(f"rank {rank} is larger than layer {name} allows (min(out, in) = {min(m, n)})")
