"""The TopK SAE baseline (Gao et al. 2024): a = TopK(ReLU(W_e x + b_e)), x_hat = W_d a + b_d, loss MSE + AuxK,
trained as the field trains it (:class:`FieldSAE`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from implicit_em.core.objective import topk_sae_objective
from implicit_em.core.sae import (
    DEAD_ROWS_CAP,
    auxk_loss,
    dead_window_rows,
    geometric_median,
)
from implicit_em.errors import check, check_choice
from implicit_em.models.base import InferenceForm, Net, UnitNormDecoder, keep_top_k, seeded_linear
from implicit_em.models.registry import register

#: the rows the geometric median of the decoder bias's start is computed on, at most
MEDIAN_ROWS = 16_384


def unit_norm_directions(in_features: int, n_components: int, seed: int) -> Tensor:
    """D x K random directions of unit norm (the decoder columns of Gao et al.'s start), from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    directions = torch.randn(in_features, n_components, generator=g)
    return directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-12)


class FieldSAE(UnitNormDecoder, Net):
    """An SAE trained as sparsify and dictionary_learning train theirs. Subclasses choose the sparsity.

    - **Start:** decoder directions (the K columns of W_d) of unit norm in random directions from the seed's own
      generator, the encoder their transpose, biases 0. The data-aware start (``--model.data_init``, on by
      default) then puts b_d at the training rows' mean (or geometric median) and b_e = -W_e b_d, so every
      pre-activation is centred on the data's centre (what sparsify's ``x - b_dec`` does at its start).
    - **Unit-norm decoder:** before each optimiser step the gradient along each decoder direction is removed,
      after it each direction is rescaled to unit norm (the code's scale then carries the magnitude).
    - **AuxK** (Gao et al.): a component that has not fired in the last ``dead_rows`` rows is dead; the k_aux
      largest pre-activations of the dead ones reconstruct what the kept codes missed, weighted by alpha.

    Args:
        unit_norm_decoder: keep the decoder directions at unit norm (false: free decoder norms).
        b_dec_start: where the data-aware start puts b_d: ``mean`` or ``median`` (geometric, Weiszfeld, on at
            most 16,384 training rows).
        aux_k: k_aux, the dead components used by the AuxK loss per input (null: d_in / 2, as Gao et al.).
        aux_coefficient: alpha, the AuxK loss's weight (1/32 as Gao et al.; 0: no AuxK loss).
        dead_rows: the dead window in rows (tokens) seen; null: min(10M, R / 10) for a run of R rows in all.
    """

    takes_k = True

    def __init__(
        self,
        in_features: int,
        n_components: int,
        k: int | None = 32,
        seed: int = 0,
        unit_norm_decoder: bool = True,
        b_dec_start: Literal["mean", "median"] = "mean",
        aux_k: int | None = None,
        aux_coefficient: float = 1 / 32,
        dead_rows: int | None = None,
    ):
        super().__init__(in_features, n_components, 32 if k is None else k, seed)
        aux_k = max(1, in_features // 2) if aux_k is None else aux_k
        check_choice(b_dec_start, "model.net.b_dec_start", ("mean", "median"))
        check(aux_k >= 1, "model.net.aux_k", "an integer >= 1 or null", aux_k)
        check(aux_coefficient >= 0, "model.net.aux_coefficient", ">= 0", aux_coefficient)
        check(dead_rows is None or dead_rows >= 1, "model.net.dead_rows", "an integer >= 1 or null", dead_rows)
        self.unit_norm_decoder, self.b_dec_start = bool(unit_norm_decoder), b_dec_start
        self.aux_k, self.aux_coefficient, self.dead_rows = aux_k, aux_coefficient, dead_rows
        self.dead_window = DEAD_ROWS_CAP if dead_rows is None else int(dead_rows)  # until the run's length is known
        generator = torch.Generator().manual_seed(self.seed)
        self.encoder = seeded_linear(in_features, n_components, generator)
        self.decoder = seeded_linear(n_components, in_features, generator)
        directions = unit_norm_directions(in_features, n_components, self.seed)
        with torch.no_grad():
            self.decoder.weight.copy_(directions)
            self.encoder.weight.copy_(directions.T)
            self.decoder.bias.zero_()
            self.encoder.bias.zero_()
        self.register_buffer("rows_since_fired", torch.zeros(n_components, dtype=torch.long))

    def first_layer(self) -> nn.Linear:
        return self.encoder

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint written before the dead window was counted in rows (no ``rows_since_fired``; the BatchTopK
        SAE's counted steps, ``steps_since_fired``) loads with every count at 0."""
        state_dict.pop(prefix + "steps_since_fired", None)
        state_dict.setdefault(prefix + "rows_since_fired", torch.zeros_like(self.rows_since_fired))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat = W_d a + b_d."""
        return self.decoder(codes)

    # -- the recipe's hooks (the training module calls them) ------------------------------------------------------
    @torch.no_grad()
    def start_from_data(self, x: Tensor, std: float | None) -> None:
        """b_d <- the mean (or geometric median) of the training rows x, b_e <- -W_e b_d. The directions keep their
        unit norm, so ``init_std`` does not apply."""
        if self.b_dec_start == "median":
            g = torch.Generator().manual_seed(self.seed)
            rows = x[torch.randperm(len(x), generator=g)[:MEDIAN_ROWS].to(x.device)]
            centre = geometric_median(rows)
        else:
            centre = x.double().mean(0)
        centre = centre.to(self.decoder.bias)
        self.decoder.bias.copy_(centre)
        self.encoder.bias.copy_(-self.encoder.weight @ centre)

    def plan_training(self, total_rows: int) -> None:
        if self.dead_rows is None:
            self.dead_window = dead_window_rows(total_rows)

    # -- the objective ------------------------------------------------------------------------------------------
    def dead(self) -> Tensor:
        """The K mask of dead components: not fired in the last ``dead_window`` rows."""
        return self.rows_since_fired >= self.dead_window

    def reconstruction_objective(self, x: Tensor, z: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """L = mean (x - x_hat)^2 + alpha L_aux (:func:`~implicit_em.core.sae.auxk_loss` of the dead components),
        x_hat = W_d a + b_d, with the batch's FVU, L_aux and the number of dead components for the logs; then
        counts the rows since each component fired (codes: N x K, z: the pre-activations)."""
        x_hat = self.decode(codes)
        terms = topk_sae_objective(x, x_hat)
        dead = self.dead()
        if self.aux_coefficient > 0:
            aux = auxk_loss(x - x_hat, z, dead, self.decoder.weight, self.aux_k)
            terms["loss"] = terms["loss"] + self.aux_coefficient * aux
        else:
            aux = z.new_zeros(())
        with torch.no_grad():
            self.rows_since_fired.add_(len(x)).masked_fill_((codes > 0).any(0), 0)
        return {**terms, "aux": aux.detach(), "dead": dead.sum().float()}

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "unit_norm_decoder": self.unit_norm_decoder, "b_dec_start": self.b_dec_start,
                "aux_k": self.aux_k, "aux_coefficient": self.aux_coefficient,
                "dead_rows": self.dead_window}  # fmt: skip


@register("topk_sae")
class TopKSAE(FieldSAE):
    """codes a = TopK(ReLU(W_e x + b_e)) with k per input (``--model.k``), x_hat = W_d a + b_d, loss MSE plus the
    AuxK loss (no L1: the TopK is the sparsity). The settings of :class:`FieldSAE`."""

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (N x K), at most k nonzero per row."""
        return keep_top_k(self.encoder(x), self.k)

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        z = self.encoder(x)
        return self.reconstruction_objective(x, z, keep_top_k(z, self.k))

    def inference_form(self) -> InferenceForm:
        decoder = (self.decoder.weight.T, self.decoder.bias)
        return InferenceForm("topk", self.encoder.weight, self.encoder.bias, decoder, k=self.k)
