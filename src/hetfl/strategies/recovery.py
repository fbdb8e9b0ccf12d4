"""Stale-update recovery by gradient inversion: turn an update computed on an old model into a fresh one.

Wang and Gao, "Tackling Intertwined Data and Device Heterogeneities in Federated Learning with
Unlimited Staleness", AAAI 2025; first titled "Tackling the Unlimited Staleness in Federated Learning
with Intertwined Data and Device Heterogeneities", arXiv:2309.13536.

A client dispatched at version t - tau returns Delta_i = U_k(w_{t-tau}; D_i) - w_{t-tau}, where U_k is
its k optimiser steps on its data D_i. The server holds the architecture, so it estimates data that
explain Delta_i at the old model, and trains the current model on the estimate instead.

1. Inversion. Synthetic data D = (X in R^{S x d}, Y = softmax(Z)) with free inputs X and free label
   logits Z (soft labels, estimated with the inputs), S = ``samples``. U_k(w; D) is the client's
   optimiser run on all of D for the client's k steps with its step size eta (SGD with momentum mu
   and weight decay lambda, as ``torch.optim.SGD``):

       g_j = grad_w CE(f(w_j; X), Y) + lambda w_j,   b_j = mu b_{j-1} + g_j  (b_0 = 0),   w_{j+1} = w_j - eta b_j

   (X, Z) minimise the relative squared error of the reproduced update, averaged over the model's
   parameter tensors l (weights and biases of each layer), on the entries M kept (all, or the
   fraction ``keep`` of Delta_i's entries largest in magnitude):

       L(D) = mean_l || M_l (U_k(w_{t-tau}; D) - w_{t-tau} - Delta_i)_l ||^2 / || M_l Delta_{i,l} ||^2

   by L-BFGS (strong-Wolfe line search) for at most ``iterations`` evaluations of L. For k = 1 and
   plain SGD this matches the pseudo-gradient (w_{t-tau} - w_i) / eta with the gradient the estimate
   gives at the old model; for k > 1 the k steps are unrolled and differentiated through, so the
   client's trajectory is not linearised.
2. Conversion. Delta~ = U_k(w_t; D*) - w_t with the estimate D* (same k and eta).
3. Switch. The converted update counts as far as its error is smaller than that of staleness: with
   L* = L(D*) on all entries (the inversion's error) and e = mean_l ||(Delta~ - Delta^)_l||^2 /
   ||Delta_{i,l}||^2, Delta^ = U_k(w_{t-tau}; D*) - w_{t-tau} (how far the model's move since t - tau
   moves the update, measured on D*),

       Delta_out = gamma Delta~ + (1 - gamma) Delta_i,   gamma = e / (e + L*)

   the least-squares weights of two estimates with independent errors L* and e (``blend``); or the paper's
   switch on the same two errors (``switch_back``, below).

From the paper: what is matched (the received update, reproduced by the client's local steps from the
old model), free soft labels, conversion by retraining the current model on the estimate, matching only
the largest entries of the update (the paper keeps 5% to save iterations, ``keep``; the authors' published
code matches every entry), and starting a client's inversion from its previous estimate (``warm_start``;
the paper does this while a client's data stay fixed). Our default differs in three places, each an option
that restores the paper's way:

- ``loss``: relative squared L2 per tensor (scale-free: 0 is exact, 1 no better than a zero update;
  normalising per tensor keeps the biases, which pin down the labels and the sign of X, from being drowned
  by the weights). ``l1`` is the authors' distance, sum |U_k - w - Delta_i| over all entries, here divided by
  ||Delta_i||_1 so that its values read like the other's (a constant factor: the same minimiser).
- ``optimizer``: L-BFGS (strong-Wolfe line search) fits these small smooth problems far more exactly: a
  logistic regression's single sample to a relative error of 5e-5 in under 40 evaluations. ``adam`` is
  the authors' code: Adam on (X, Z), X's gradient replaced by its sign, lr divided by 10 at 3/8, 5/8 and
  7/8 of ``iterations`` (their code: lr 1 on images clamped to the pixel range, 10,000 to 40,000
  iterations, 128 to 256 samples; our inputs are unbounded features, so lr 0.1 is the sensible setting).
- ``switch_back``: the paper switches back to plain asynchronous FL late in training, once the
  inversion's error outweighs the staleness error it corrects; with ``switch_back`` (and ``blend`` off)
  the converted update is used alone until the first update with L* >= e, and from then on every
  update as it arrives, at no further cost. The authors' code decides this once, globally, with an
  oracle a server does not have (the client's true update at the current model, by its own data);
  L* and e are the server's estimates of the same two errors. Our default, ``blend``, makes the trade
  per update and smoothly.

No filter of which stale updates are worth converting (one by cosine distance to fresh updates was
thought to be the paper's) is in the authors' code, and none is done here: every update at least
``min_staleness`` versions old is converted. Our own choice, where the paper leaves room: the initialisation
(X, Z ~ N(0, 1), seeded by task id and client, so a run is reproducible whatever order events come in).
Measured at the paper's large staleness (docs/benchmarks.md, "Stale-update recovery"): at an equal budget of
50 iterations the default converts better than the paper's variant, whose switch fires at once.

Approximated: the client trained on mini-batches of its own data, the server trains on all S synthetic
samples each step, so D* stands for the client's data distribution, not its samples (S need not be the
client's sample count). Task options other than ``lr`` (FedProx's ``prox_mu``, SCAFFOLD's
``correction``) are not reproduced. Adam as the local optimiser is refused: its first steps move every
coordinate by about lr sign(g), so its update shows the gradient's signs rather than the gradient.

Supported: logistic regression and MLPs on feature inputs, where the server holds the whole architecture
and the inputs are free real vectors. CNNs (inversion far less well posed, far costlier) and token inputs
(discrete) are refused with a ConfigError.

Cost, on the server (``metrics()``): with F forward FLOPs per sample (two per multiply-add, as in
``models.cost``), an evaluation of L unrolls k steps on S samples, each a forward (1 F) and a backward
kept as a graph (2 F), and L's gradient differentiates back through that graph (about twice its cost,
6 F): ``INVERSION_FACTOR`` = 9 F per sample and step. The reproduction at the old model and the
conversion at the current one add 3 F each:  FLOPs = S k F (9 evaluations + 6).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from hetfl.errors import ConfigError
from hetfl.models.cost import BACKWARD_FACTOR
from hetfl.models.zoo import MLP, LogisticRegression
from hetfl.strategies.base import Server, Update

INVERSION_FACTOR = 3.0 * BACKWARD_FACTOR  # forward + backward kept as a graph (3 F), gradient through it (6 F)
SUPPORTED_MODELS = ("logreg", "mlp")


class RecoveryConfig(BaseModel):
    """How stale updates are refreshed (``strategy.params.recovery``)."""

    model_config = ConfigDict(extra="forbid")

    min_staleness: int = Field(2, ge=1, description="Refresh updates at least this stale; fresher ones are used as they are.")
    iterations: int = Field(100, ge=1, description="Evaluations of the matching loss the inversion may spend (its budget).")
    samples: int = Field(8, ge=1, description="Synthetic samples per update; they stand for the client's data distribution.")
    lr: float = Field(
        1.0, gt=0, description="Inversion's step: L-BFGS's initial step (its line search adapts it), or Adam's learning rate."
    )
    keep: float = Field(
        1.0, gt=0, le=1, description="Fraction of the update's entries matched, the largest in magnitude (the paper keeps 0.05)."
    )
    warm_start: bool = Field(True, description="Start a client's inversion from its previous estimate (its data are fixed).")
    blend: bool = Field(
        True, description="Mix converted and stale update by their estimated errors; false uses the converted update alone."
    )
    loss: Literal["relative_l2", "l1"] = Field(
        "relative_l2", description="Matching loss: squared L2 relative per tensor, or the authors' L1 (relative, all entries)."
    )
    optimizer: Literal["lbfgs", "adam"] = Field(
        "lbfgs", description="Inversion's optimiser: L-BFGS, or the authors' Adam (signed input gradient, lr decayed 10x "
        "at 3/8, 5/8, 7/8 of the iterations; set lr, e.g. 0.1)."
    )
    switch_back: bool = Field(
        False, description="The paper's switch: from the first update whose inversion error is at least its staleness "
        "error, stop converting and use stale updates as they are (plain asynchronous FL)."
    )


class StaleRecovery:
    """Refreshes stale updates by gradient inversion (the method is in the module docstring).

    Parameters
    ----------
    cfg : RecoveryConfig
        Staleness threshold and inversion budget.
    """

    def __init__(self, cfg: RecoveryConfig) -> None:
        self.cfg = cfg
        self._estimates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client -> (X, Z), for warm starts
        self.recovered = 0
        self.failed = 0  # inversions without a finite estimate (the stale update was used)
        self.wall_s = 0.0
        self.flops = 0.0
        self.loss_sum = 0.0
        self.weight_sum = 0.0
        self.switched_at: int | None = None  # server version at which switch_back stopped the conversions

    # -- checks: refuse early what the method does not cover ----------------------------------------
    @staticmethod
    def check_model(model_name: str) -> None:
        if model_name not in SUPPORTED_MODELS:
            raise ConfigError(
                f"strategy.params.recovery: gradient inversion supports model.name logreg or mlp, not {model_name}; "
                "change the model or remove recovery"
            )

    @staticmethod
    def check_training(optimizer: str) -> None:
        if optimizer != "sgd":
            raise ConfigError(
                f"strategy.params.recovery: gradient inversion reproduces SGD local steps, not training.optimizer "
                f"{optimizer}; use sgd (momentum allowed) or remove recovery"
            )

    def check_trainer(self, model: nn.Module, optimizer: str) -> None:
        """The server's model and optimiser, once the federation is built (catches token inputs too)."""
        self.check_training(optimizer)
        if isinstance(model, nn.Sequential):  # build_model puts a OneHot in front for token inputs
            raise ConfigError(
                "strategy.params.recovery: gradient inversion needs real-valued feature inputs, not token (text) "
                "inputs; remove recovery for this dataset"
            )
        if not isinstance(model, (LogisticRegression, MLP)):
            self.check_model(type(model).__name__.lower())

    # -- the method ----------------------------------------------------------------------------------
    def recover(self, server: Server, update: Update) -> Update:
        """``update`` if fresher than ``min_staleness``, else a fresh one: version = server.version."""
        staleness = server.version - update.task.version
        target = update.delta
        if staleness < self.cfg.min_staleness or not bool(target.any()) or self.switched_at is not None:
            return update
        started = time.perf_counter()
        trainer = server.trainer
        self.check_trainer(trainer.model, trainer.cfg.optimizer)
        local = LocalSteps(trainer.model, update.steps, float(update.task.options.get("lr", trainer.cfg.lr)),
                           trainer.cfg.momentum, trainer.cfg.weight_decay)
        x, z, evaluations = self._invert(local, update, target)
        with torch.no_grad():
            y = z.softmax(dim=1)
            reproduced = local.delta(update.task.params, x, y)
            converted = local.delta(server.params, x, y)
        loss = float(local.error(reproduced, target, target, norm=self.cfg.loss))
        drift = float(local.error(converted, reproduced, target, norm=self.cfg.loss))
        self.flops += self.cfg.samples * update.steps * local.forward_flops * (
            INVERSION_FACTOR * evaluations + 2 * BACKWARD_FACTOR)
        if not (math.isfinite(loss) and math.isfinite(drift)):
            self.failed += 1
            self.wall_s += time.perf_counter() - started
            return update
        gamma, switched = converted_weight(loss, drift, blend=self.cfg.blend, switch_back=self.cfg.switch_back)
        if switched:
            self.switched_at = server.version
            self.wall_s += time.perf_counter() - started
            return update
        if self.cfg.warm_start:
            self._estimates[update.client_id] = (x, z)
        self.recovered += 1
        self.loss_sum += loss
        self.weight_sum += gamma
        self.wall_s += time.perf_counter() - started
        stats = {**update.stats, "recovered": 1.0, "recovery_loss": loss, "recovery_weight": gamma,
                 "recovered_staleness": float(staleness)}
        return replace(
            update,
            task=replace(update.task, version=server.version, params=server.params),
            params=server.params + gamma * converted + (1.0 - gamma) * target,
            stats=stats,
            arrived_version=server.version,
        )

    def _invert(self, local: "LocalSteps", update: Update, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Start (X, Z) at the client's previous estimate, or N(0, 1) seeded by task and client; :func:`invert`."""
        cfg = self.cfg
        if cfg.warm_start and update.client_id in self._estimates:
            x0, z0 = self._estimates[update.client_id]
        else:
            seed = int(np.random.SeedSequence([update.task.task_id, update.client_id, 7]).generate_state(1)[0])
            gen = torch.Generator().manual_seed(seed)
            x0 = torch.randn(cfg.samples, local.in_features, generator=gen)
            z0 = torch.randn(cfg.samples, local.n_classes, generator=gen)
        return invert(local, update.task.params, target, x0, z0, iterations=cfg.iterations, lr=cfg.lr, keep=cfg.keep,
                      loss=cfg.loss, optimizer=cfg.optimizer)

    def metrics(self) -> dict[str, float]:
        """Cumulative cost and quality of the recoveries so far (for ``metrics.jsonl``)."""
        n = max(self.recovered, 1)
        return {
            "recovered": float(self.recovered),
            "recovery_failed": float(self.failed),
            "recovery_wall_s": self.wall_s,
            "recovery_flops": self.flops,
            "recovery_loss": self.loss_sum / n,  # mean final matching loss L*
            "recovery_weight": self.weight_sum / n,  # mean gamma
            "recovery_switched_at": float(self.switched_at) if self.switched_at is not None else -1.0,
        }


def converted_weight(loss: float, drift: float, *, blend: bool, switch_back: bool) -> tuple[float, bool]:
    """Weight gamma of the converted update (1 - gamma goes to the stale one), and whether to switch back.

    ``loss`` is the inversion's error L*, ``drift`` the staleness error e. The paper's switch (``switch_back``)
    fires once L* >= e; otherwise ``blend`` gives e / (e + L*) and no blend the converted update alone.
    """
    if switch_back and loss >= drift:
        return 0.0, True
    if blend and drift + loss > 0:
        return drift / (drift + loss), False
    return 1.0, False


def invert(
    local: "LocalSteps",
    w_old: torch.Tensor,
    target: torch.Tensor,
    x0: torch.Tensor,
    z0: torch.Tensor,
    *,
    iterations: int,
    lr: float = 1.0,
    keep: float = 1.0,
    loss: str = "relative_l2",
    optimizer: str = "lbfgs",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inputs X and label logits Z, from (x0, z0), whose local steps from ``w_old`` reproduce ``target``.

    Minimises L (module docstring, norm ``loss``) for at most ``iterations`` evaluations, by L-BFGS or by the
    authors' Adam (X's gradient replaced by its sign, lr divided by 10 at 3/8, 5/8 and 7/8 of the iterations);
    returns (X, Z, evaluations).
    """
    x, z = x0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    kept = target.abs().topk(max(1, int(keep * target.numel()))).indices if keep < 1.0 else None
    w_old = w_old.detach()
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        error = local.error(local.delta(w_old, x, z.softmax(dim=1), create_graph=True), target, target, kept, norm=loss)
        x.grad, z.grad = torch.autograd.grad(error, [x, z])
        return error.detach()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([x, z], lr=lr, max_iter=iterations, max_eval=iterations, line_search_fn="strong_wolfe")
        opt.step(closure)
    else:
        opt = torch.optim.Adam([x, z], lr=lr)
        milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        decay = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(iterations):
            closure()
            x.grad.sign_()
            opt.step()
            decay.step()
    return x.detach(), z.detach(), evaluations


class LocalSteps:
    """U_k(w; D) - w: k SGD steps (momentum, weight decay) on all of D, differentiable in D; and the loss L."""

    def __init__(
        self, model: nn.Module, steps: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        self.model, self.steps, self.lr = model, steps, lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.shapes = [(name, p.shape) for name, p in model.named_parameters()]  # the order of trainer.flat
        self.segment = torch.cat([torch.full((p.numel(),), i) for i, p in enumerate(model.parameters())])
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.in_features, self.n_classes = linears[0].in_features, linears[-1].out_features
        self.forward_flops = float(sum(2.0 * m.in_features * m.out_features for m in linears))

    def delta(self, w0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """Model change after ``steps`` steps from ``w0`` on (x, soft labels y); a graph back to x, y if asked."""
        with torch.enable_grad():
            w = w0.detach().requires_grad_(True)
            buf = None
            for _ in range(self.steps):
                if not create_graph:
                    w = w.detach().requires_grad_(True)
                params, offset = {}, 0
                for name, shape in self.shapes:
                    params[name] = w[offset : offset + shape.numel()].view(shape)
                    offset += shape.numel()
                loss = F.cross_entropy(functional_call(self.model, params, (x,)), y)
                (g,) = torch.autograd.grad(loss, w, create_graph=create_graph)
                if self.weight_decay:
                    g = g + self.weight_decay * w
                buf = g if buf is None or not self.momentum else self.momentum * buf + g
                w = w - self.lr * buf
        out = w - w0
        return out if create_graph else out.detach()

    def error(
        self, a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor | None = None,
        *, norm: str = "relative_l2",
    ) -> torch.Tensor:
        """The distance of a from b relative to ref, on the entries ``keep`` (all if None).

        ``relative_l2``: mean over parameter tensors l of ||(a - b)_l||^2 / ||ref_l||^2, tensors with ref_l = 0 on
        those entries left out. ``l1`` (the authors' distance): ||a - b||_1 / ||ref||_1 over all those entries.
        """
        diff, seg = a - b, self.segment
        if keep is not None:
            diff, ref, seg = diff[keep], ref[keep], seg[keep]
        if norm == "l1":
            return diff.abs().sum() / ref.abs().sum()
        sq, ref_sq = diff.square(), ref.square()
        n = len(self.shapes)
        num = torch.zeros(n, dtype=sq.dtype).index_add(0, seg, sq)
        den = torch.zeros(n, dtype=sq.dtype).index_add(0, seg, ref_sq)
        used = den > 0
        return (num[used] / den[used]).mean()
