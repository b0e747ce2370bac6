"""Input normalisations fitted on training rows and stored with the model: x' = ((x - mean) * scale) @ matrix."""

from __future__ import annotations

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
