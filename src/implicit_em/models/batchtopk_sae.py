"""The BatchTopK SAE baseline with the AuxK dead-latent loss (Bussmann et al. 2024; Gao et al. 2024).

Training keeps the N k largest codes of the whole batch (so k per input on average, more for some inputs and
fewer for others) and, for latents that have not fired for ``dead_steps`` optimiser steps, adds the AuxK loss:
those latents alone, their k_aux largest per input, reconstruct what the kept codes missed. Inference (what
evaluation and export see) replaces the batch's top-k by one threshold theta, the running mean of the smallest
code each batch kept: a = z * 1[z > theta], SAELens's JumpReLU form with theta for every latent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from implicit_em.core.distributed import gather_samples
from implicit_em.errors import check
from implicit_em.models.base import InferenceForm, batch_top_k, jump_relu, update_running_threshold
from implicit_em.models.registry import register
from implicit_em.models.topk_sae import TiedStartSAE


def auxk_loss(error: Tensor, z: Tensor, dead: Tensor, decoder_weight: Tensor, k_aux: int) -> Tensor:
    """L_aux = ||e - e_hat||^2 / ||e - mean(e)||^2, e_hat = W_d TopK_aux(ReLU(z) on dead latents only).

    ``error`` e = x - x_hat (N x D, a target: no gradient), ``dead`` a K mask, ``decoder_weight`` W_d (D x K).
    Normalised by the error's own variance so its scale does not depend on how well the SAE already does.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return z.new_zeros(())
    masked = torch.where(dead, z, torch.full_like(z, -torch.inf))
    values, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    codes = torch.zeros_like(z).scatter(-1, idx, F.relu(values))
    e_hat = codes @ decoder_weight.T
    target = error.detach()
    denominator = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(target.dtype).tiny)
    return (target - e_hat).pow(2).sum() / denominator


@register("batchtopk_sae")
class BatchTopKSAE(TiedStartSAE):
    """BatchTopK SAE: k codes per input on average over each batch in training, a threshold at inference.

    Args:
        aux_k: k_aux, the dead latents used by the AuxK loss per input (null: d_in / 2, as Gao et al.).
        aux_coefficient: alpha, the AuxK loss's weight (1/32, as Gao et al.).
        dead_steps: a latent that has not fired for this many optimiser steps counts as dead.
        threshold_momentum: theta <- m theta + (1 - m) theta_batch each step (the first step sets theta).
    """

    def __init__(
        self,
        in_features: int,
        n_components: int,
        k: int | None = 32,
        seed: int = 0,
        aux_k: int | None = None,
        aux_coefficient: float = 1 / 32,
        dead_steps: int = 256,
        threshold_momentum: float = 0.99,
    ):
        super().__init__(in_features, n_components, 32 if k is None else k, seed)
        aux_k = max(1, in_features // 2) if aux_k is None else aux_k
        check(aux_k >= 1, "model.net.aux_k", "an integer >= 1 or null", aux_k)
        check(aux_coefficient >= 0, "model.net.aux_coefficient", ">= 0", aux_coefficient)
        check(dead_steps >= 1, "model.net.dead_steps", ">= 1", dead_steps)
        check(0 <= threshold_momentum < 1, "model.net.threshold_momentum", "in [0, 1)", threshold_momentum)
        self.aux_k, self.aux_coefficient, self.dead_steps = aux_k, aux_coefficient, dead_steps
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_set", torch.tensor(False))
        self.register_buffer("steps_since_fired", torch.zeros(n_components, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """The inference codes a = z * 1[z > theta] (N x K), z = ReLU(W_e x + b_e)."""
        return jump_relu(F.relu(self.encoder(x)), self.threshold)

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        z = gather_samples(self.encoder(x))  # the global batch under DDP: one batch top-k, one threshold
        x = gather_samples(x)
        codes, theta_batch = batch_top_k(z, self.k)
        x_hat = self.decode(codes)
        error = x - x_hat
        mse = error.pow(2).mean()
        dead = self.steps_since_fired >= self.dead_steps
        aux = auxk_loss(error, z, dead, self.decoder.weight, self.aux_k)
        self._track(codes.detach(), theta_batch.detach())
        fvu = error.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        return {"loss": mse + self.aux_coefficient * aux, "mse": mse, "aux": aux.detach(), "fvu": fvu.detach(),
                "dead": dead.sum().float(), "threshold": self.threshold.clone()}  # fmt: skip

    @torch.no_grad()
    def _track(self, codes: Tensor, theta_batch: Tensor) -> None:
        """Count the steps since each latent fired, and move theta towards this batch's smallest kept code."""
        fired = (codes > 0).any(0)
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        update_running_threshold(self.threshold, self.threshold_set, theta_batch, self.threshold_momentum)

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "aux_k": self.aux_k, "aux_coefficient": self.aux_coefficient,
                "dead_steps": self.dead_steps, "threshold": float(self.threshold)}  # fmt: skip

    def inference_form(self) -> InferenceForm:
        decoder = (self.decoder.weight.T, self.decoder.bias)
        threshold = self.threshold.expand(self.n_components).clone()
        return InferenceForm("jumprelu", self.encoder.weight, self.encoder.bias, decoder, threshold=threshold,
                             extra={"trained_as": "batchtopk", "k": self.k})  # fmt: skip
