"""The BatchTopK SAE baseline with the AuxK dead-component loss (Bussmann et al. 2024; Gao et al. 2024).

Training keeps the N k largest codes of the whole batch (so k per input on average, more for some inputs and
fewer for others), with the recipe of :class:`~implicit_em.models.topk_sae.FieldSAE` (unit-norm decoder, b_d at
the data's centre, AuxK). Inference (what evaluation and export see) replaces the batch's top-k by one threshold
theta: a = z * 1[z > theta], SAELens's JumpReLU form with theta for every component. After the last optimiser
step theta is set from the training rows so that their mean L0 is exactly k
(:func:`~implicit_em.core.sae.mean_l0_threshold`); during training it is the running mean of the smallest code
each batch kept (what validation sees, and the final value with ``threshold_fit running``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from implicit_em.core.distributed import gather_samples
from implicit_em.core.sae import mean_l0_threshold
from implicit_em.errors import check, check_choice
from implicit_em.models.base import InferenceForm, batch_top_k, jump_relu, update_running_threshold
from implicit_em.models.registry import register
from implicit_em.models.topk_sae import FieldSAE

#: rows per chunk of the threshold's fit over the training rows
THRESHOLD_CHUNK_ROWS = 4096


@register("batchtopk_sae")
class BatchTopKSAE(FieldSAE):
    """BatchTopK SAE: k codes per input on average over each batch in training, a threshold at inference.

    Args (beyond :class:`~implicit_em.models.topk_sae.FieldSAE`'s):
        threshold_fit: ``train_rows``: after training, theta such that the training rows' mean L0 is exactly k;
            ``running``: keep the running mean of the batches' smallest kept code.
        threshold_momentum: theta <- m theta + (1 - m) theta_batch each step (the first step sets theta).
    """

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
        threshold_fit: Literal["train_rows", "running"] = "train_rows",
        threshold_momentum: float = 0.99,
    ):
        super().__init__(in_features, n_components, k, seed, unit_norm_decoder, b_dec_start, aux_k,
                         aux_coefficient, dead_rows)  # fmt: skip
        check_choice(threshold_fit, "model.net.threshold_fit", ("train_rows", "running"))
        check(0 <= threshold_momentum < 1, "model.net.threshold_momentum", "in [0, 1)", threshold_momentum)
        self.threshold_fit, self.threshold_momentum = threshold_fit, threshold_momentum
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_set", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        """The inference codes a = z * 1[z > theta] (N x K), z = ReLU(W_e x + b_e)."""
        return jump_relu(F.relu(self.encoder(x)), self.threshold)

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        z = gather_samples(self.encoder(x))  # the global batch under DDP: one batch top-k, one threshold
        x = gather_samples(x)
        codes, theta_batch = batch_top_k(z, self.k)
        terms = self.reconstruction_objective(x, z, codes)
        update_running_threshold(self.threshold, self.threshold_set, theta_batch.detach(), self.threshold_momentum)
        return {**terms, "threshold": self.threshold.clone()}

    @torch.no_grad()
    def finish_training(self, x: Tensor) -> None:
        """theta <- the threshold at which the training rows x have mean L0 exactly k (``threshold_fit
        train_rows``)."""
        if self.threshold_fit != "train_rows":
            return
        codes = lambda: (F.relu(self.encoder(rows)) for rows in x.split(THRESHOLD_CHUNK_ROWS))  # noqa: E731
        self.threshold.copy_(mean_l0_threshold(codes, self.k))
        self.threshold_set.fill_(True)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold_fit": self.threshold_fit, "threshold": float(self.threshold)}

    def inference_form(self) -> InferenceForm:
        decoder = (self.decoder.weight.T, self.decoder.bias)
        threshold = self.threshold.expand(self.n_components).clone()
        return InferenceForm("jumprelu", self.encoder.weight, self.encoder.bias, decoder, threshold=threshold,
                             extra={"trained_as": "batchtopk", "k": self.k})  # fmt: skip
