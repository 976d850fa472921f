"""Behaviour of the pure initialization math (quailora_app.engine.methods.init_math)."""
from __future__ import annotations

import math

import pytest
import torch

from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.init_math import (
    DampedH,
    LowRankErrors,
    calibrated_error,
    calibrated_objective,
    check_rank,
    closed_form_correction,
    damped,
    quailora_correction,
    split_factors,
    svd_correction,
    weight_error,
)
from quailora_app.errors import ConfigError


def correlated_inputs(n: int, N: int, seed: int, outliers: int = 3) -> torch.Tensor:
    """X = L Z (n x N): strong channel correlations from a few shared factors, plus outlier channels."""
    g = torch.Generator().manual_seed(seed)
    k = max(n // 8, 2)
    L = 0.2 * torch.eye(n, dtype=torch.float64) + torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, n, generator=g, dtype=torch.float64
    ) / math.sqrt(n)
    X = L @ torch.randn(n, N, generator=g, dtype=torch.float64)
    idx = torch.randperm(n, generator=g)[:outliers]
    X[idx] *= 25.0
    return X


def problem(m: int, n: int, seed: int = 0, N: int = 4000, outliers: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, H): a noise-like quantization error with per-row scales, and H = X X^T / N."""
    g = torch.Generator().manual_seed(seed + 1000)
    E = torch.randn(m, n, generator=g, dtype=torch.float64) * (0.5 + torch.rand(m, 1, generator=g, dtype=torch.float64))
    X = correlated_inputs(n, N, seed, outliers)
    return E, X @ X.T / N


def damped_objective(E, C, spec: DampedH) -> float:
    return calibrated_objective(E, C, spec.damped())


def symmetric_root_closed_form(E: torch.Tensor, H: torch.Tensor, rank: int) -> torch.Tensor:
    """Reference optimum through the symmetric root S = (H + lambda I)^1/2 (eigh): C* = SVD_r(E S) S^-1."""
    w, V = torch.linalg.eigh(damped(H).damped())
    S, S_inv = (V * w.sqrt()) @ V.T, (V * w.rsqrt()) @ V.T
    U, s, Wh = torch.linalg.svd(E @ S, full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Wh[:rank] @ S_inv


@pytest.mark.parametrize("m,n,rank,seed,outliers",
                         [(48, 80, 4, 0, 3), (96, 64, 8, 1, 3), (40, 120, 16, 2, 3), (96, 64, 16, 3, 0)])
def test_als_reaches_closed_form_optimum(m, n, rank, seed, outliers):
    E, H = problem(m, n, seed, outliers=outliers)
    spec = damped(H, damping=0.01)
    P, Rt = quailora_correction(E, spec, rank, rounds=20)
    Pc, Rtc = closed_form_correction(E, spec, rank)
    assert P.shape == (m, rank) and Rt.shape == (rank, n)
    assert Pc.shape == (m, rank) and Rtc.shape == (rank, n)
    als = damped_objective(E, P @ Rt, spec)
    opt = damped_objective(E, Pc @ Rtc, spec)
    svd = damped_objective(E, torch.matmul(*svd_correction(E, rank)), spec)
    base = damped_objective(E, torch.zeros_like(E), spec)
    assert opt <= als * (1 + 1e-10) and opt <= svd * (1 + 1e-10)
    assert abs(als - opt) / opt < 0.01
    # ... and the ALS captured nearly all of the reducible part, not just a small objective gap
    assert (base - als) / (base - opt) > 0.97


def test_closed_form_is_optimal_against_random_rank_r_corrections():
    E, H = problem(50, 70, seed=3)
    spec = damped(H)
    Pc, Rtc = closed_form_correction(E, spec, 6)
    opt = damped_objective(E, Pc @ Rtc, spec)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):  # perturbations of the optimum never do better
        dP = 1e-2 * torch.randn(Pc.shape, generator=g, dtype=torch.float64)
        dR = 1e-2 * torch.randn(Rtc.shape, generator=g, dtype=torch.float64)
        assert damped_objective(E, (Pc + dP) @ (Rtc + dR), spec) >= opt


def test_als_objective_never_increases():
    E, H = problem(60, 90, seed=4)
    spec = damped(H)
    values = [damped_objective(E, torch.matmul(*quailora_correction(E, spec, 5, rounds=k)), spec) for k in range(0, 8)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]  # round 0 is the plain svd start
    P0, R0 = svd_correction(E, 5)
    assert math.isclose(values[0], damped_objective(E, P0 @ R0, spec), rel_tol=1e-10)


def test_error_ordering_on_correlated_inputs():
    E, H = problem(64, 96, seed=5)
    spec = damped(H)
    r = 8
    c_svd = torch.matmul(*svd_correction(E, r))
    c_q = torch.matmul(*quailora_correction(E, spec, r))
    c_cf = torch.matmul(*closed_form_correction(E, spec, r))
    qlora = calibrated_error(E, torch.zeros_like(E), H)
    svd, q, cf = (calibrated_error(E, c, H) for c in (c_svd, c_q, c_cf))
    assert qlora == pytest.approx(1.0)
    assert qlora > svd > q
    assert q < 0.9 * svd  # calibration matters a lot with correlated inputs and outliers
    assert cf <= q * 1.01
    # the uncalibrated svd wins on the plain weight error, as it must
    assert weight_error(E, c_svd) < weight_error(E, c_q)
    assert weight_error(E, torch.zeros_like(E)) == pytest.approx(1.0)


@pytest.mark.parametrize("m,n,rank", [(30, 50, 1), (50, 30, 7), (40, 40, 40)])
def test_svd_is_eckart_young(m, n, rank):
    g = torch.Generator().manual_seed(m + n + rank)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    P, Rt = svd_correction(E, rank)
    assert P.shape == (m, rank) and Rt.shape == (rank, n)
    sv = torch.linalg.svdvals(E)
    expected = float(sv[rank:].pow(2).sum().sqrt() / sv.pow(2).sum().sqrt())
    assert weight_error(E, P @ Rt) == pytest.approx(expected, abs=1e-10)
    assert torch.linalg.matrix_rank(P @ Rt) == rank


def test_corrections_pad_when_e_has_low_rank():
    g = torch.Generator().manual_seed(11)
    E = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 60, generator=g, dtype=torch.float64)
    _, H = problem(40, 60, seed=6)
    spec = damped(H)
    for P, Rt in (svd_correction(E, 8), closed_form_correction(E, spec, 8), quailora_correction(E, spec, 8)):
        assert P.shape == (40, 8) and Rt.shape == (8, 60)
        assert torch.isfinite(P).all() and torch.isfinite(Rt).all()
        assert weight_error(E, P @ Rt) < 1e-8  # rank 3 is captured exactly


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("alpha", [1, 16, 32])
@pytest.mark.parametrize("rslora", [False, True])
def test_split_factors_reproduces_correction(rank, alpha, rslora):
    E, H = problem(48, 72, seed=rank)
    P, Rt = closed_form_correction(E, damped(H), rank)
    s = alpha / math.sqrt(rank) if rslora else alpha / rank
    A, B = split_factors(P, Rt, s)
    assert A.shape == (rank, 72) and B.shape == (48, rank)
    assert A.dtype == B.dtype == torch.float32 and A.is_contiguous() and B.is_contiguous()
    C = P @ Rt
    got = s * B.double() @ A.double()
    assert torch.linalg.matrix_norm(got - C) / torch.linalg.matrix_norm(C) < 1e-6
    # balanced: A and B carry the same share of each singular value (up to the scaling)
    assert torch.allclose(A.double().norm(dim=1), B.double().norm(dim=0), rtol=1e-4)
    # the wrong scaling (alpha/r instead of alpha/sqrt(r)) would leave a real error behind
    if rslora and rank > 1:
        wrong = (alpha / rank) * B.double() @ A.double()
        assert torch.linalg.matrix_norm(wrong - C) / torch.linalg.matrix_norm(C) > 0.4


def test_split_factors_with_true_rank_below_r():
    g = torch.Generator().manual_seed(12)
    r, true_rank = 8, 3
    P = (torch.randn(30, true_rank, generator=g, dtype=torch.float64)
         @ torch.randn(true_rank, r, generator=g, dtype=torch.float64))
    Rt = torch.randn(r, 45, generator=g, dtype=torch.float64)
    s = 16 / r
    A, B = split_factors(P, Rt, s)
    assert A.shape == (r, 45) and B.shape == (30, r)
    C = P @ Rt
    assert torch.linalg.matrix_norm(s * B.double() @ A.double() - C) / torch.linalg.matrix_norm(C) < 1e-6
    dead = B.norm(dim=0) == 0
    assert int(dead.sum()) == r - true_rank
    # A keeps learnable (non-zero, orthogonal) rows where B is zero, like peft's default init
    assert (A.norm(dim=1) > 0).all()
    Vn = A.double() / A.double().norm(dim=1, keepdim=True)
    assert torch.allclose(Vn @ Vn.T, torch.eye(r, dtype=torch.float64), atol=1e-5)
    # zero correction: B = 0, A non-zero
    A0, B0 = split_factors(torch.zeros(30, r), torch.zeros(r, 45), 2.0)
    assert (B0 == 0).all() and (A0.norm(dim=1) > 0).all()


def test_split_factors_float32_inputs():
    E, H = problem(32, 48, seed=9)
    P, Rt = closed_form_correction(E, damped(H), 4)
    A, B = split_factors(P.float(), Rt.float(), 2.0)
    C = (P @ Rt).float()
    assert torch.linalg.matrix_norm(2.0 * B @ A - C) / torch.linalg.matrix_norm(C) < 1e-5


def test_calibrated_error_definitions():
    E, H = problem(20, 30, seed=8)
    g = torch.Generator().manual_seed(13)
    C = 0.3 * torch.randn(20, 30, generator=g, dtype=torch.float64)
    ratio = calibrated_objective(E, C, H) / calibrated_objective(E, torch.zeros_like(E), H)
    assert calibrated_error(E, C, H) == pytest.approx(math.sqrt(ratio), rel=1e-12)
    D = E - C
    assert calibrated_objective(E, C, H) == pytest.approx(float(torch.trace(D @ H @ D.T)), rel=1e-10)
    eye = torch.eye(30, dtype=torch.float64)
    assert calibrated_error(E, C, eye) == pytest.approx(weight_error(E, C), rel=1e-12)
    assert calibrated_error(E, E, H) == pytest.approx(0.0, abs=1e-12)
    assert weight_error(torch.zeros(3, 4), torch.zeros(3, 4)) == 0.0
    # float32 inputs work and agree
    assert calibrated_error(E.float(), C.float(), H.float()) == pytest.approx(calibrated_error(E, C, H), rel=1e-4)


def test_with_identity_h_closed_form_equals_svd():
    g = torch.Generator().manual_seed(14)
    E = torch.randn(25, 35, generator=g, dtype=torch.float64)
    spec = damped(torch.eye(35, dtype=torch.float64))
    Pc, Rtc = closed_form_correction(E, spec, 5)
    Ps, Rts = svd_correction(E, 5)
    assert torch.allclose(Pc @ Rtc, Ps @ Rts, atol=1e-10)


def test_check_rank():
    check_rank(8, (64, 32), "model.layers.0.self_attn.q_proj")
    check_rank(32, (64, 32), "x")
    message = r"rank 33 is larger than layer model\.layers\.0\.mlp\.down_proj allows \(min\(out, in\) = 32\)"
    with pytest.raises(ConfigError, match=message):
        check_rank(33, (64, 32), "model.layers.0.mlp.down_proj")
    with pytest.raises(ConfigError, match="k_proj"):
        check_rank(0, (64, 32), "k_proj")


def test_damped_h_of_a_zero_h_falls_back_to_the_svd():
    zero = damped(torch.zeros(6, 6))
    assert zero.damping_lambda > 0
    E = torch.randn(4, 6, dtype=torch.float64)
    Pc, Rtc = closed_form_correction(E, zero, 2)
    Ps, Rts = svd_correction(E, 2)
    assert torch.allclose(Pc @ Rtc, Ps @ Rts, atol=1e-10)
    with pytest.raises(ValueError):
        damped(torch.zeros(3, 4))


@pytest.mark.parametrize("m,n,rank", [(48, 80, 4), (96, 64, 8), (40, 120, 16), (64, 64, 8), (12, 20, 15), (20, 12, 15)])
def test_cholesky_closed_form_equals_symmetric_root_closed_form(m, n, rank):
    """The engine's exact routes (E Hd E^T for m <= n, Cholesky for m > n) give the optimum the symmetric root
    gives, also for ranks beyond min(m, n)."""
    E, H = problem(m, n, seed=5)
    h = damped(H)
    P1, Rt1 = closed_form_correction(E, h, rank)
    assert torch.allclose(P1 @ Rt1, symmetric_root_closed_form(E, H, rank), rtol=1e-8, atol=1e-9)
    P3, Rt3 = closed_form_correction(E, h, rank, EHd=E @ h.damped())  # E Hd handed over by the error report
    assert torch.allclose(P3 @ Rt3, P1 @ Rt1, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("m,n,rank", [(48, 80, 4), (96, 64, 8), (120, 40, 16), (200, 300, 8)])
def test_randomized_closed_form_reaches_the_exact_objective(m, n, rank):
    E, H = problem(m, n, seed=6, outliers=0)  # no outliers: the flattest spectrum, the hardest case for it
    h = damped(H)
    exact = calibrated_objective(E, torch.matmul(*closed_form_correction(E, h, rank)), h.damped())
    P, Rt = closed_form_correction(E, h, rank, solver="randomized")
    assert P.shape == (m, rank) and Rt.shape == (rank, n)
    approx = calibrated_objective(E, P @ Rt, h.damped())
    assert exact <= approx * (1 + 1e-12)
    assert (approx - exact) / exact < 1e-5
    again = closed_form_correction(E, h, rank, solver="randomized")
    assert torch.equal(again[0] @ again[1], P @ Rt)  # seeded: deterministic


def test_randomized_closed_form_pads_ranks_beyond_the_layer():
    E, H = problem(12, 20, seed=7)
    P, Rt = closed_form_correction(E, damped(H), 15, solver="randomized")
    assert P.shape == (12, 15) and Rt.shape == (15, 20)
    assert calibrated_objective(E, P @ Rt, H) < 1e-18 * calibrated_objective(E, torch.zeros_like(E), H)


def test_low_rank_errors_match_the_direct_formulas():
    E, H = problem(40, 64, seed=8)
    meter = LowRankErrors(E, damped(H))
    for rank in (1, 5, 17):
        P, Rt = closed_form_correction(E, damped(H), rank)
        w, c = meter.errors(P, Rt)
        assert w == pytest.approx(weight_error(E, P @ Rt), rel=1e-9)
        assert c == pytest.approx(calibrated_error(E, P @ Rt, H), rel=1e-9)
    zero = meter.errors(torch.zeros(40, 3, dtype=torch.float64), torch.zeros(3, 64, dtype=torch.float64))
    assert zero == pytest.approx((1.0, 1.0))


def test_damped_h_cholesky_survives_a_singular_h_without_damping():
    X = torch.randn(30, 5, dtype=torch.float64)
    h = damped(X @ X.T, damping=0.0)  # rank 5 of 30: only the jitter makes it factorizable
    L = h.cholesky()
    assert torch.allclose(L @ L.T, h.damped(), atol=1e-6 * float(h.damped().diagonal().mean()))


def test_svd_shared_between_methods_is_exact_and_never_stale():
    """svd and quailora reuse one Gram eigh per E (init_math._LastGram): the results equal a fresh computation,
    an in-place change of E or a new tensor (even at a reused address) is computed afresh."""
    gen = torch.Generator().manual_seed(3)
    E = torch.randn(48, 32, generator=gen, dtype=torch.float64)
    fresh_P, fresh_Rt = init_math.svd_correction(E.clone(), 4)
    P, Rt = init_math.svd_correction(E, 4)
    assert init_math._last_gram.get(E) is not None  # the next method on this E reads it
    P2, Rt2 = init_math.svd_correction(E, 6)  # another rank from the same decomposition
    assert torch.equal(P, fresh_P) and torch.equal(Rt, fresh_Rt)
    assert torch.allclose(P2[:, :4] @ Rt2[:4], P @ Rt, atol=1e-12)
    E.mul_(2.0)  # in place: the version counter moves, the cached eigh is not used
    assert init_math._last_gram.get(E) is None
    P3, Rt3 = init_math.svd_correction(E, 4)
    assert torch.allclose(P3 @ Rt3, 2 * (P @ Rt), atol=1e-10)
    for _ in range(20):  # fresh tensors of the same shape (the allocator reuses addresses): never a hit
        del E
        E = torch.randn(48, 32, generator=gen, dtype=torch.float64)
        assert init_math._last_gram.get(E) is None
        P4, Rt4 = init_math.svd_correction(E, 4)
        ref_P, ref_Rt = init_math.svd_correction(E.clone(), 4)
        assert torch.equal(P4 @ Rt4, ref_P @ ref_Rt)
    del E
    assert init_math._last_gram.value is None  # freed with its matrix
