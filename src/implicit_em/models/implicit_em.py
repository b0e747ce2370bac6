"""The paper's decoder-free model: distances d = phi(W x + b), trained on the implicit-EM objective."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_em.distributed import gather_samples
from implicit_em.errors import check, check_choice
from implicit_em.models.base import (
    ACTIVATIONS,
    InferenceForm,
    Net,
    batch_top_k,
    column_top_k,
    jump_relu,
    keep_top_k,
    seeded_linear,
    update_running_threshold,
)
from implicit_em.models.registry import register
from implicit_em.objective import (
    centre_distance,
    implicit_em_objective,
    kept_lse_loss,
    readout_residual_loss,
    tempered_distance,
    truncated_lse_loss,
    truncated_objective,
    truncation_gap_loss,
    unkept_lse_loss,
)

#: what a sparse net (``k`` set) reads as its code: the depths relu(-z) of its k nearest components, or the
#: k largest distances relu(z)
SPARSE_CODES = ("depth", "distance")
#: which quantity the sparse net trains the implicit-EM objective on
SPARSE_OBJECTIVES = ("truncated", "code", "dense")
#: which quantity the truncated objective's decorrelation term sees: the sparse code a or the dense depth relu(s z)
SPARSE_TC = ("code", "depth")
#: the truncated objective's likelihood term: the truncated E-step L_LSE^T, the gap L_LSE^T - L_LSE, or the
#: truncated E-step of a Gaussian mixture whose centres are -w_j (``centres``)
SPARSE_LSE = {"truncated": truncated_lse_loss, "gap": truncation_gap_loss, "centres": truncated_lse_loss}
#: how the sparse net selects its kept components in training: the k largest per row, the N k largest of the batch,
#: or each component's N k / K largest (the last two read a threshold at inference: one, or one per component)
SELECTIONS = {"row": None, "batch": batch_top_k, "component": column_top_k}


@register("implicit_em")
class ImplicitEM(Net):
    """d = phi(W x + b): K components (the rows of W), no decoder; the codes are the distances d (with k, the
    sparse code below).

    Args:
        activation: phi, one of relu, softplus, abs, square, exp, identity.
        lambda_lse: weight of the log-sum-exp (mixture likelihood) term.
        lambda_var: weight of the variance term -sum_j log(Var d_j + eps) (prevents dead components).
        lambda_tc: weight of the decorrelation term ||Corr(d) - I||^2 (prevents redundant components).
        lambda_wr: weight of the weight-orthogonality term ||W_n W_n^T - I||^2 (0: off).
        eps: added to each variance inside the log of the variance term.
        tc_components: null (default): the exact decorrelation term. m < K: its unbiased estimate from m
            components drawn afresh each step (the same on every rank, fixed by the seed and the step, so
            resumed runs draw the same); see ``objective.decorrelation_subset_estimate`` for its variance.

    Sparse codes (``--model.k k``; null, the default, is the paper's model, unchanged to the bit): with
    z = W x + b, the code users read (training, evaluation, readout, export: this forward) is
    a = TopK_k(relu(s z)), SAELens's ``topk`` form of the affine map s (W x + b).

        code: ``depth`` (s = -1, the default): the k components nearest to x, each valued by its depth
            relu(-z) inside its halfspace (where the distance d = phi(z) is smallest); ``distance`` (s = +1):
            the k largest distances.
        sparse_objective: ``truncated`` (the default): the truncated E-step L_LSE^T over the k selected
            components (``objective.truncated_lse_loss``), the decorrelation term on the code a and the
            variance term on the dense depth relu(s z) (every component's, so none stays outside every
            input's top k: no dead components); ``code``: the paper's objective on the code a; ``dense``: the
            paper's objective on d = phi(z), only the code sparse.
        temperature: tau of the truncated E-step's distances d = tau phi(z / tau)
            (``objective.tempered_distance``); with ``activation softplus`` it sets how much of the responsibility
            reaches the selected components (relu gives them none: d = 0 there). 1 (the default): d = phi(z).
        sparse_lse: the truncated objective's likelihood term: ``truncated`` (the default, L_LSE^T) or ``gap``
            (L_LSE^T - L_LSE, ``objective.truncation_gap_loss``: the kept components pulled in, the others pushed
            out by their responsibilities) or ``centres``: the components are Gaussian centres mu_j = -w_j, the
            affine map z = W x + b + ||w_j||^2 / 2 (so TopK keeps the k nearest centres, b_j a learned log-prior,
            and the code is the depth relu(mu_j . x - ||mu_j||^2 / 2 - b_j)) and the likelihood term the truncated
            E-step over the Gaussian distances d = z - b (``objective.centre_distance``), whose gradient moves each
            kept centre by r~_ij (x_i - mu_j): k-means' M-step (the activation and temperature are unused); it
            starts as k-means does, mu_j at K training inputs (:meth:`start_from_data`).
        sparse_tc: what the truncated objective decorrelates: ``code`` (the default, a) or ``depth`` (the dense
            relu(s z), with the variance term).
        lambda_aux: weight of the E-step over the components no row of the batch keeps
            (``objective.unkept_lse_loss``: each moved toward the inputs it is nearest to, against dead
            components); 0 (the default): off. aux_k: how many of them per row (null: k).
        lambda_rec: weight of the batch's held-out least-squares readout error of the code
            (``objective.readout_residual_loss``; a readout solved per batch, no decoder parameters; not the
            implicit-EM objective: it measures how much of the SAEs' CE lead the objective leaves on the table);
            0 (the default): off.
        selection: ``row`` (the default): the k nearest components of every input, as above. ``batch``: training
            keeps the N k largest depths relu(s z) of the whole batch (k per input on average, more for inputs
            near many components), the truncated E-step over each row's kept set (``objective.kept_lse_loss``),
            the decorrelation term on that code and the variance term on the dense depth; inference and export
            replace the batch's selection by one threshold theta, the running mean (``theta_momentum``) of
            the smallest depth each batch kept: a = relu(s z) 1[s z > theta], SAELens's ``jumprelu`` form.
            theta starts where the data-aware start's code has L0 k; ``theta_momentum`` 0.9 (the
            BatchTopK SAE's 0.99 lags the growing depths by over 10% of L0 in runs of a few hundred steps).
            ``component``: the same with each component's N k / K largest depths in training (every component
            fires on as many inputs, so none is dead) and a threshold theta_j per component at inference.
    """

    takes_k = True

    def __init__(
        self,
        in_features: int,
        n_components: int,
        k: int | None = None,
        seed: int = 0,
        activation: str = "relu",
        lambda_lse: float = 1.0,
        lambda_var: float = 1.0,
        lambda_tc: float = 1.0,
        lambda_wr: float = 0.0,
        eps: float = 1e-6,
        tc_components: int | None = None,
        code: str = "depth",
        sparse_objective: str = "truncated",
        temperature: float = 1.0,
        sparse_tc: str = "code",
        sparse_lse: str = "truncated",
        lambda_aux: float = 0.0,
        aux_k: int | None = None,
        selection: str = "row",
        theta_momentum: float = 0.9,
        lambda_rec: float = 0.0,
    ):
        super().__init__(in_features, n_components, k, seed)
        check_choice(code, "model.net.code", SPARSE_CODES)
        check_choice(sparse_objective, "model.net.sparse_objective", SPARSE_OBJECTIVES)
        check_choice(sparse_tc, "model.net.sparse_tc", SPARSE_TC)
        check(temperature > 0, "model.net.temperature", "> 0", temperature)
        check_choice(sparse_lse, "model.net.sparse_lse", tuple(SPARSE_LSE))
        self.sparse_lse = sparse_lse
        check(lambda_aux >= 0, "model.net.lambda_aux", ">= 0", lambda_aux)
        check(aux_k is None or aux_k >= 1, "model.net.aux_k", "null or an integer >= 1", aux_k)
        check(lambda_aux == 0 or (k is not None and sparse_objective == "truncated" and sparse_lse == "truncated"
                                  and sparse_tc == "code"),
              "model.net.lambda_aux", "0 unless --model.k is set with the default sparse_lse and sparse_tc",
              lambda_aux)  # fmt: skip
        self.lambda_aux, self.aux_k = lambda_aux, aux_k
        check_choice(selection, "model.net.selection", tuple(SELECTIONS))
        check(selection == "row" or (k is not None and sparse_objective == "truncated" and sparse_lse == "truncated"
                                     and sparse_tc == "code"),
              "model.net.selection", "row unless --model.k is set with the default sparse_lse and sparse_tc",
              selection)  # fmt: skip
        check(0 <= theta_momentum < 1, "model.net.theta_momentum", "in [0, 1)", theta_momentum)
        self.selection, self.theta_momentum = selection, theta_momentum
        check(lambda_rec >= 0, "model.net.lambda_rec", ">= 0", lambda_rec)
        check(lambda_rec == 0 or k is not None, "model.net.lambda_rec", "0 unless --model.k is set", lambda_rec)
        self.lambda_rec = lambda_rec
        if selection != "row":  # the inference threshold (only then: the paper's model keeps its state dict)
            self.register_buffer("threshold", torch.zeros(() if selection == "batch" else (n_components,)))
            self.register_buffer("threshold_set", torch.tensor(False))
        self.code, self.sparse_objective = code, sparse_objective
        self.temperature, self.sparse_tc = temperature, sparse_tc
        check_choice(activation, "model.net.activation", ACTIVATIONS)
        check(tc_components is None or tc_components >= 2, "model.net.tc_components", "null or an integer >= 2",
              tc_components)  # fmt: skip
        self.lambdas = {"lambda_lse": lambda_lse, "lambda_var": lambda_var, "lambda_tc": lambda_tc,
                        "lambda_wr": lambda_wr}  # fmt: skip
        for key, lam in self.lambdas.items():
            check(lam >= 0, f"model.net.{key}", ">= 0", lam)
        check(any(lam > 0 for lam in self.lambdas.values()), "model.net.lambda_*", "not all 0 (nothing to train)",
              self.lambdas)  # fmt: skip
        check(eps > 0, "model.net.eps", "> 0", eps)
        self.activation, self.eps, self.tc_components = activation, eps, tc_components
        self.linear = seeded_linear(in_features, n_components, torch.Generator().manual_seed(self.seed))
        self.phi = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        """The codes (N x K): the distances d = phi(W x + b) when k is None (the paper's model); with k, the
        sparse code of :meth:`sparse_code`."""
        if self.k is None:
            return self.phi(self.linear(x))
        return self.sparse_code(self.pre_activation(x))

    @property
    def centres(self) -> bool:
        """Whether the components are Gaussian centres (``sparse_lse centres``, k set)."""
        return self.k is not None and self.sparse_lse == "centres"

    def pre_activation(self, x: Tensor) -> Tensor:
        """z = W x + b, plus ||w_j||^2 / 2 when the components are centres."""
        z = self.linear(x)
        return z + 0.5 * self.linear.weight.pow(2).sum(-1) if self.centres else z

    @property
    def code_sign(self) -> int:
        """s in the sparse code TopK_k(relu(s z)): -1 for depths (nearest first), +1 for distances."""
        return -1 if self.code == "depth" else 1

    def sparse_code(self, z: Tensor) -> Tensor:
        """a = TopK_k(relu(s z)): ``depth`` (s = -1) keeps the k components nearest to x (largest -z, the
        depth inside their halfspace), ``distance`` (s = +1) the k largest distances; every other entry 0.
        With ``selection batch``: a = relu(s z) 1[s z > theta], the trained threshold."""
        if self.selection != "row":
            return jump_relu(F.relu(self.code_sign * z), self.threshold)
        return keep_top_k(self.code_sign * z, self.k)

    @torch.no_grad()
    def start_from_data(self, x: Tensor, std: float | None) -> None:
        """The data-aware start; with centres, k-means' start instead: mu_j = K distinct training inputs drawn
        with the net's seed (w_j = -x_j, b = 0). With ``selection batch``, theta then starts at the smallest of
        the N k largest depths of (up to 8,192 of) the inputs x, so the untrained net's code has L0 k there too."""
        if not self.centres:
            super().start_from_data(x, std)
            if self.selection != "row":
                g = torch.Generator().manual_seed(self.seed)
                rows = x[torch.randperm(len(x), generator=g)[:8192].to(x.device)]
                select = SELECTIONS[self.selection]
                theta = select(self.code_sign * self.pre_activation(rows.to(self.linear.weight)), self.k)[1]
                self.threshold.copy_(theta)
                self.threshold_set.fill_(True)
            return
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(len(x), generator=g)[: self.n_components].to(x.device)
        if len(pick) < self.n_components:  # fewer inputs than components: draw with replacement
            pick = torch.randint(len(x), (self.n_components,), generator=g).to(x.device)
        self.linear.weight.copy_(-x[pick].to(self.linear.weight))
        self.linear.bias.zero_()

    def first_layer(self) -> nn.Linear:
        return self.linear

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        if self.k is not None:
            return self._sparse_objective(x, step)
        d = gather_samples(self(x))  # the global batch under DDP
        weight = self.component_weights() if self.lambdas["lambda_wr"] else None
        m = self.tc_components
        subsets = torch.Generator().manual_seed(self.seed * 1_000_003 + step) if m else None
        return implicit_em_objective(d, weight, eps=self.eps, tc_components=m, generator=subsets, **self.lambdas)

    def _sparse_objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        """The objective of the sparse net (k set), by ``sparse_objective`` (see the class docstring), plus
        ``lambda_rec`` times the batch's readout error of the code (``objective.readout_residual_loss``)."""
        terms = self._sparse_em_objective(x, step)
        if not self.lambda_rec:
            return terms
        z = gather_samples(self.pre_activation(x))  # the global batch under DDP
        a = (
            keep_top_k(self.code_sign * z, self.k)
            if self.selection == "row"
            else SELECTIONS[self.selection](self.code_sign * z, self.k)[0]
        )
        rec = readout_residual_loss(gather_samples(x), a)
        return {**terms, "loss": terms["loss"] + self.lambda_rec * rec, "rec": rec}

    def _sparse_em_objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        """The implicit-EM part of :meth:`_sparse_objective`."""
        z = gather_samples(self.pre_activation(x))  # the global batch under DDP
        weight = self.component_weights() if self.lambdas["lambda_wr"] else None
        m = self.tc_components
        subsets = torch.Generator().manual_seed(self.seed * 1_000_003 + step) if m else None
        if self.sparse_objective == "dense":
            return implicit_em_objective(self.phi(z), weight, eps=self.eps, tc_components=m, generator=subsets,
                                         **self.lambdas)  # fmt: skip
        if self.selection != "row":
            return self._batch_objective(z, weight, m, subsets)
        if self.sparse_objective == "truncated" and self.sparse_lse == "truncated" and self.sparse_tc == "code":
            # the default: no N x K temporaries
            return truncated_objective(z, self.code_sign, self.k, self._distance, weight, eps=self.eps,
                                       tc_components=m, generator=subsets, lambda_aux=self.lambda_aux,
                                       aux_k=self.aux_k, **self.lambdas)  # fmt: skip
        s = self.code_sign * z
        values, index = s.topk(self.k, dim=-1)
        a = torch.zeros_like(z).scatter(-1, index, F.relu(values))  # = self.sparse_code(z), one top-k
        if self.sparse_objective == "code":
            return implicit_em_objective(a, weight, eps=self.eps, tc_components=m, generator=subsets, **self.lambdas)
        # truncated: the E-step over the k selected components, L_tc on the code (or the dense depth), L_var on
        # the dense depth
        lam = self.lambdas
        if self.centres:  # the Gaussian distances: z without the log-prior b
            d = centre_distance(z - 0.5 * self.linear.weight.pow(2).sum(-1) - self.linear.bias, self.linear.weight)
        else:
            d = self._distance(z)
        lse = SPARSE_LSE[self.sparse_lse](d, index)
        if self.sparse_tc == "depth":
            terms = implicit_em_objective(F.relu(s), weight, 0.0, lam["lambda_var"], lam["lambda_tc"],
                                          lam["lambda_wr"], self.eps, m, subsets)  # fmt: skip
            return {**terms, "loss": terms["loss"] + lam["lambda_lse"] * lse, "lse": lse}
        terms = implicit_em_objective(a, weight, 0.0, 0.0, lam["lambda_tc"], lam["lambda_wr"], self.eps, m, subsets)
        var = implicit_em_objective(F.relu(s), None, 0.0, lam["lambda_var"], 0.0, 0.0, self.eps)["var"]
        loss = terms["loss"] + lam["lambda_var"] * var + lam["lambda_lse"] * lse
        return {**terms, "loss": loss, "lse": lse, "var": var}

    def _batch_objective(self, z: Tensor, weight: Tensor | None, m: int | None, subsets) -> dict[str, Tensor]:
        """``selection batch`` or ``component``: the truncated objective on the depths the selection keeps (class
        docstring), and the running threshold moved toward the smallest of them (training steps only)."""
        lam = self.lambdas
        s = self.code_sign * z
        a, theta_batch = SELECTIONS[self.selection](s, self.k)
        if self.training:
            update_running_threshold(self.threshold, self.threshold_set, theta_batch.detach(),
                                     self.theta_momentum)  # fmt: skip
        kept = a > 0
        lse = kept_lse_loss(self._distance(z), kept)
        terms = implicit_em_objective(a, weight, 0.0, 0.0, lam["lambda_tc"], lam["lambda_wr"], self.eps, m, subsets)
        var = implicit_em_objective(F.relu(s), None, 0.0, lam["lambda_var"], 0.0, 0.0, self.eps)["var"]
        out = {**terms, "lse": lse, "var": var, "threshold": self.threshold.detach().mean()}  # logged: a scalar
        loss = terms["loss"] + lam["lambda_var"] * var + lam["lambda_lse"] * lse
        if self.lambda_aux:
            out["aux"] = unkept_lse_loss(z, kept.nonzero()[:, -1], self.code_sign, self.aux_k or self.k,
                                         self._distance)  # fmt: skip
            loss = loss + self.lambda_aux * out["aux"]
        return {**out, "loss": loss}

    def _distance(self, z: Tensor) -> Tensor:
        """The truncated E-step's distances d = tau phi(z / tau)."""
        return tempered_distance(z, self.phi, self.temperature)

    def settings(self) -> dict[str, Any]:
        own = {"activation": self.activation, **self.lambdas, "eps": self.eps, "tc_components": self.tc_components}
        if self.k is not None:
            own.update(k=self.k, code=self.code, sparse_objective=self.sparse_objective, temperature=self.temperature,
                       sparse_tc=self.sparse_tc, sparse_lse=self.sparse_lse, lambda_aux=self.lambda_aux,
                       aux_k=self.aux_k, selection=self.selection, lambda_rec=self.lambda_rec)  # fmt: skip
            if self.selection != "row":
                own.update(theta_momentum=self.theta_momentum, threshold=float(self.threshold.mean()))
        return own

    def inference_form(self) -> InferenceForm:
        from implicit_em.errors import ConfigError

        if self.k is not None:  # the sparse code is TopK_k(relu(s z)) whatever phi the objective uses
            sign = self.code_sign
            bias = self.linear.bias + (0.5 * self.linear.weight.pow(2).sum(-1) if self.centres else 0)
            if self.selection != "row":  # relu(s z) 1[s z > theta]
                threshold = self.threshold.expand(self.n_components).clone()
                return InferenceForm("jumprelu", sign * self.linear.weight, sign * bias, threshold=threshold,
                                     extra={"code": self.code, "trained_as": f"{self.selection}topk", "k": self.k})  # fmt: skip
            return InferenceForm("topk", sign * self.linear.weight, sign * bias, k=self.k,
                                 extra={"code": self.code})  # fmt: skip
        if self.activation != "relu":
            raise ConfigError(
                f"activation {self.activation!r} cannot be exported: SAELens's standard architecture computes "
                "relu(x W_enc + b_enc); export a run trained with --model.net.activation relu"
            )
        return InferenceForm("standard", self.linear.weight, self.linear.bias)
