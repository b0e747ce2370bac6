"""Input normalisations fitted on training rows and stored with the model: x' = ((x - mean) * scale) @ matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_em.errors import check_choice

#: none: x' = x; center: x - mean; center+scale: (x - mean) / s with s the mean row norm of x - mean (rows of
#: norm ~1 on average); standardize: per feature (x - mean) / std; zca: (x - mean) C^-1/2 with C + 0.1 mean(eig) I
NORMALIZATIONS = ("none", "center", "center+scale", "standardize", "zca")


@dataclass
class Normalization:
    """x' = ((x - mean) * scale) @ matrix; a part that is None is the identity. D-vectors, D x D matrix."""

    mean: Tensor | None = None
    scale: Tensor | None = None
    matrix: Tensor | None = None

    @classmethod
    def fit(cls, x: Tensor, kind: str) -> Normalization:
        """The normalisation ``kind`` fitted on training rows x (N x D), in float64."""
        check_choice(kind, "data.normalization", NORMALIZATIONS)
        if kind == "none":
            return cls()
        x = x.double()
        mean = x.mean(0)
        c = x - mean
        if kind == "center":
            return cls(mean.float())
        if kind == "center+scale":
            s = c.norm(dim=1).mean().clamp_min(1e-12)
            return cls(mean.float(), (1.0 / s).expand(x.shape[1]).float().clone())
        if kind == "standardize":
            std = c.pow(2).mean(0).sqrt()
            std[std < 1e-8] = 1.0
            return cls(mean.float(), (1.0 / std).float())
        cov = c.T @ c / max(len(x) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        whiten = (evecs / (evals.clamp_min(0) + 0.1 * evals.mean()).sqrt()) @ evecs.T
        return cls(mean.float(), None, whiten.float())

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.scale is not None:
            x = x * self.scale.to(x.device)
        if self.matrix is not None:
            x = x @ self.matrix.to(x.device)
        return x

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"mean": self.mean, "scale": self.scale, "matrix": self.matrix}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor | None]) -> Normalization:
        return cls(state.get("mean"), state.get("scale"), state.get("matrix"))

    # -- the affine map in float64: its inverse, and folding it into linear maps (export) ---------------------
    def parts(self, dims: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mean D, scale D, matrix D x D' or None) in float64 on the CPU, a missing mean or scale the identity;
        D = the matrix's rows when there is one, else ``dims``. No matrix stays None: a D x D identity costs a
        D^3 inverse and D^2 products for nothing (seconds at CIFAR's 3,072 dims)."""
        d = int(self.matrix.shape[0]) if self.matrix is not None else dims
        mean = torch.zeros(d, dtype=torch.float64) if self.mean is None else self.mean.double().cpu().reshape(d)
        scale = torch.ones(d, dtype=torch.float64) if self.scale is None else self.scale.double().cpu().expand(d)
        matrix = None if self.matrix is None else self.matrix.double().cpu()
        return mean, scale, matrix

    @property
    def is_identity(self) -> bool:
        return self.mean is None and self.scale is None and self.matrix is None

    def inverse(self) -> Callable[[Tensor], Tensor] | None:
        """x' -> x: (x' M^-1) / s + m (M^-1 the pseudo-inverse when M is not square); None for the identity."""
        if self.is_identity:
            return None
        dims = next(len(v) for v in (self.mean, self.scale) if v is not None) if self.matrix is None else 0
        mean, scale, matrix = self.parts(dims)
        inverse = None if matrix is None else _inverse(matrix)

        def to_raw(x: Tensor) -> Tensor:
            y = x.double() if inverse is None else x.double() @ inverse.to(x.device)
            return (y / scale.to(x.device) + mean.to(x.device)).to(x.dtype)

        return to_raw

    def fold_encoder(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """W_enc (D x K), b_enc (K) with x W_enc + b_enc = x' W^T + b for x' the normalised x.

        x' W^T = ((x - m) * s) M W^T, so W_enc = diag(s) M W^T and b_enc = b - (m * s) M W^T.
        """
        mean, scale, matrix = self.parts(weight.shape[1])
        mw = weight.double().T if matrix is None else matrix @ weight.double().T
        return scale.unsqueeze(1) * mw, bias.double() - (mean * scale) @ mw

    def unfold_decoder(self, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """W_dec (K x D), b_dec (D) with f W_dec + b_dec = unnormalise(f R + c), a decoder in raw units.

        x = (x' M^-1) / s + m, so W_dec = (R M^-1) / s and b_dec = (c M^-1) / s + m.
        """
        mean, scale, matrix = self.parts(r.shape[1])
        r, c = r.double(), c.double()
        if matrix is not None:
            inverse = _inverse(matrix)
            r, c = r @ inverse, c @ inverse
        return r / scale, c / scale + mean


def _inverse(matrix: Tensor) -> Tensor:
    return torch.linalg.inv(matrix) if matrix.shape[0] == matrix.shape[1] else torch.linalg.pinv(matrix)
