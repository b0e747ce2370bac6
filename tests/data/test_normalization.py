"""The normalisations' inverse and their folding into linear maps (what evaluation and export use)."""

from __future__ import annotations

import pytest
import torch

from implicit_em.data.normalization import Normalization

D = 6


def test_fold_and_unfold_by_hand():
    """No normalisation: W_enc = W^T, b_enc = b; R, c unchanged. Scale only: W_enc = diag(s) W^T."""
    w, b = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([1.0, 0.0, -1.0])
    w_enc, b_enc = Normalization().fold_encoder(w, b)
    assert torch.equal(w_enc, w.double().T) and torch.equal(b_enc, b.double())
    norm = Normalization(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5]))
    w_enc, b_enc = norm.fold_encoder(w, b)
    assert w_enc.tolist() == [[2.0, 6.0, 10.0], [1.0, 2.0, 3.0]]
    assert b_enc.tolist() == [1 - 3.0, 0 - 8.0, -1 - 13.0]  # b - (m * s) W^T: (m * s) = (2, 0.5)
    w_dec, b_dec = norm.unfold_decoder(torch.tensor([[2.0, 2.0]]), torch.tensor([4.0, 1.0]))
    assert w_dec.tolist() == [[1.0, 4.0]] and b_dec.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("kind", ["center", "center+scale", "standardize", "zca"])
def test_the_inverse_undoes_each_normalisation(kind):
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(0)) * 3 + 2
    norm = Normalization.fit(x, kind)
    torch.testing.assert_close(norm.inverse()(norm(x)), x, atol=1e-4, rtol=1e-4)
    assert Normalization().inverse() is None


@pytest.mark.parametrize("kind", ["center", "center+scale", "standardize"])
def test_without_a_matrix_nothing_is_inverted_or_multiplied_by_an_identity(kind, monkeypatch):
    """Per-feature normalisations undo and fold feature by feature: no D x D inverse (seconds at CIFAR's 3,072
    dims), same numbers as by hand."""
    from implicit_em.data import normalization

    def refuse(matrix):
        raise AssertionError(f"a {tuple(matrix.shape)} inverse for a normalisation without a matrix")

    monkeypatch.setattr(normalization, "_inverse", refuse)
    x = torch.randn(100, 3072, generator=torch.Generator().manual_seed(3)) * 3 + 2
    norm = Normalization.fit(x, kind)
    torch.testing.assert_close(norm.inverse()(norm(x)), x, atol=1e-4, rtol=1e-4)
    mean, scale = norm.mean.double(), norm.scale.double() if norm.scale is not None else torch.ones(3072).double()
    w, b = torch.randn(4, 3072, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w_enc, b_enc = norm.fold_encoder(w, b)
    torch.testing.assert_close(w_enc, scale[:, None] * w.T)
    torch.testing.assert_close(b_enc, b - (mean * scale) @ w.T)
    w_dec, b_dec = norm.unfold_decoder(w, b[:1].expand(3072))
    torch.testing.assert_close(w_dec, w / scale)
    torch.testing.assert_close(b_dec, b[:1].expand(3072) / scale + mean)


def test_a_folded_encoder_on_raw_rows_equals_the_encoder_on_normalised_rows():
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(1)) * 2 - 1
    norm = Normalization.fit(x, "zca")
    w, b = torch.randn(4, D, generator=torch.Generator().manual_seed(2)), torch.randn(4)
    w_enc, b_enc = norm.fold_encoder(w, b)
    torch.testing.assert_close(x.double() @ w_enc + b_enc, (norm(x) @ w.T + b).double(), atol=1e-5, rtol=1e-5)
