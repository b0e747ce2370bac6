"""The SAE recipe's maths: unit norms and the parallel gradient, the geometric median, Gao's learning rate and
the schedule, the dead window, the AuxK loss, and the threshold of mean L0 k."""

from __future__ import annotations

import math

import pytest
import torch

from implicit_em.core.sae import (
    auxk_loss,
    dead_window_rows,
    gao_learning_rate,
    geometric_median,
    lr_factor,
    mean_l0_threshold,
    remove_parallel_gradient,
    unit_norm,
    warmup_steps_for,
)


def test_unit_norm_and_the_parallel_gradient_by_hand():
    w = unit_norm(torch.tensor([[3.0, 0.0], [4.0, 2.0]]), dim=0)  # columns (3, 4) / 5 and (0, 2) / 2
    assert torch.allclose(w, torch.tensor([[0.6, 0.0], [0.8, 1.0]]))
    g = torch.tensor([[1.0, 5.0], [2.0, 7.0]])
    # column 0: g.w = 0.6 + 1.6 = 2.2, g - 2.2 w = (1 - 1.32, 2 - 1.76); column 1: g.w = 7, g - 7 w = (5, 0)
    expected = torch.tensor([[1 - 1.32, 5.0], [2 - 1.76, 0.0]])
    got = remove_parallel_gradient(w, g, dim=0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose((got * w).sum(0), torch.zeros(2), atol=1e-6)  # nothing left along the directions


def test_a_step_along_the_projected_gradient_keeps_the_norm_to_first_order():
    w = unit_norm(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=0)
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    eps = 1e-3
    kept = (w - eps * remove_parallel_gradient(w, g, 0)).norm(dim=0)
    moved = (w - eps * g).norm(dim=0)
    assert (kept - 1).abs().max() < 5e-5 < 5e-4 < (moved - 1).abs().max()  # eps^2 |g|^2 / 2 against eps g.w


def test_geometric_median_resists_an_outlier_and_matches_a_symmetric_set():
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert torch.allclose(geometric_median(square).float(), torch.zeros(2), atol=1e-5)
    points = torch.cat([torch.zeros(9, 2), torch.tensor([[1000.0, 0.0]])])
    median = geometric_median(points)
    assert median.norm() < 1.0 < points.mean(0).norm()  # the mean is pulled to 100, the median stays near 0


def test_gao_learning_rate():
    assert gao_learning_rate(2**14) == pytest.approx(2e-4)
    assert gao_learning_rate(2**12) == pytest.approx(4e-4)  # 4x fewer components: 2x the rate
    assert gao_learning_rate(2304) == pytest.approx(2e-4 / math.sqrt(2304 / 16384))


def test_lr_factor_warms_up_holds_and_decays_to_zero():
    T, W, F = 100, 10, 0.2
    factors = [lr_factor(t, T, W, F) for t in range(T)]
    assert factors[0] == pytest.approx(0.1) and factors[4] == pytest.approx(0.5) and factors[9] == 1.0
    assert factors[10:80] == [1.0] * 70  # constant between warm-up and decay
    assert (
        factors[80] == pytest.approx(1.0) and factors[90] == pytest.approx(0.5) and factors[99] == pytest.approx(0.05)
    )
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # never rises after the warm-up
    assert [lr_factor(t, T, 0, 0.0) for t in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_warmup_and_dead_window_scale_with_the_run():
    assert warmup_steps_for(650) == 32 and warmup_steps_for(10**6) == 1000
    assert dead_window_rows(668_000) == 66_800 and dead_window_rows(10**9) == 10_000_000


def test_auxk_loss_reconstructs_the_error_from_dead_components_only():
    decoder = torch.eye(3)  # component j writes unit j
    z = torch.tensor([[2.0, 1.0, 3.0], [2.0, 1.0, 3.0]])
    error = torch.tensor([[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])  # mean 0: ||e - mean e||^2 = 8
    only_0 = torch.tensor([True, False, False])  # component 0 alone may explain the error: e_hat = (2, 0, 0) per row
    assert float(auxk_loss(error, z, only_0, decoder, 1)) == pytest.approx((0 + 16) / 8)
    only_2 = torch.tensor([False, False, True])  # component 2: e_hat = (0, 0, 3) per row
    assert float(auxk_loss(error, z, only_2, decoder, 1)) == pytest.approx((4 + 9 + 4 + 9) / 8)
    assert float(auxk_loss(error, z, torch.zeros(3, dtype=torch.bool), decoder, 1)) == 0.0


@pytest.mark.parametrize("k", [1, 3, 12])
def test_mean_l0_threshold_gives_exactly_k_per_row_whatever_the_chunks(k):
    g = torch.Generator().manual_seed(k)
    # rows of very different scales, so that chunk thresholds differ and the bracket matters
    codes = torch.relu(torch.randn(500, 40, generator=g)) * torch.linspace(0.1, 5, 500)[:, None]
    by_hand = codes.flatten().sort(descending=True).values[500 * k]  # the (N k + 1)-th largest
    for chunk in (7, 64, 500):
        theta = mean_l0_threshold(lambda c=chunk: iter(codes.split(c)), k)
        assert float(theta) == float(by_hand)
        assert int((codes > theta).sum()) == 500 * k


def test_mean_l0_threshold_is_zero_when_too_few_codes_are_positive():
    codes = torch.zeros(10, 6)
    codes[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    assert float(mean_l0_threshold(lambda: iter(codes.split(4)), 2)) == 0.0  # 3 positive codes < N k = 20
