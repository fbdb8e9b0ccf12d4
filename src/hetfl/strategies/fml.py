"""FML: a private model of any architecture and a shared "meme" model teach each other (arXiv:2006.16765).

Every client trains a private model of its own architecture next to the shared meme model, and the two
learn from each other by deep mutual learning.

Shen, Zhang, Jia, Zhang, Huang, Zhou, Kuang, Wu and Wu, "Federated Mutual Learning" (arXiv:2006.16765).
The server's model (the *global* model) has the federation's reference architecture (``model.name``);
each client k keeps a *private* model of its own architecture (a model zoo may give clients different
ones, ``model.zoo``), which never leaves it. In a task, client k receives the global model as its
*meme* model m (a fresh copy each round) and, on every mini-batch (x, y) of its data, both models
forward on the same batch, giving class distributions p_k = softmax(private(x)) and
p_m = softmax(meme(x)), and both take one optimiser step on their own loss:

    L_private = alpha * CE(p_k, y) + (1 - alpha) * KL(p_m || p_k)
    L_meme    = beta  * CE(p_m, y) + (1 - beta)  * KL(p_k || p_m)

with KL(q || p) = sum_c q_c log(q_c / p_c), averaged over the batch. As in deep mutual learning, the
other model's distribution is a target: it is detached, so each loss moves only its own model. The
paper's experiments set alpha = beta = 0.5, the defaults here. The client sends the meme back; the
server sets the global model to the sample-weighted mean of the memes (FedAvg):

    w <- sum_k p_k m_k,    p_k = n_k / sum_j n_j over the round's updates.

Evaluation: ``global_model`` is True, so the engine scores the global (meme) model as the federation's
model, and ``personalised`` is True, so each client is also scored with its private model (its
architecture's initial model before its first task).

Both models are whole flat vectors, buffers included (BatchNorm's running statistics): the private model's
stay on the client, the meme's are averaged with its parameters. FML reads only the models' outputs, so it
takes any ``torch.nn.Module`` (no classifier head is needed).

Choices of hetfl's:

- Both models step together on one forward of each (the paper's simultaneous update), each with a fresh
  optimiser of ``training.*`` per task (no gradient clipping).
- Without a zoo the meme and the private model have the same architecture; the meme then trains in a
  second model instance (``LocalTrainer.twin``). Both then start from the architecture's one initial
  draw, so in a client's first task they move identically (the KL terms vanish at p_k = p_m); they part
  ways as soon as the server averages memes.
- Cost: a task trains two models for ``steps`` steps each, and ``compute_steps`` charges ``2 * steps``
  steps of the client's architecture. With a zoo a meme step really costs a step of the reference
  architecture, so this over- or under-charges by the ratio of the two architectures' FLOPs.
  ``Update.steps`` stays the task's steps; the loss reported is the meme's (what travels), the private
  model's is in the update's ``stats["private_loss"]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from hetfl.errors import DivergedError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.hetero import OwnModels
from hetfl.strategies.rounds import RoundStrategy, weighted_mean
from hetfl.strategies.selection import Selection


def mutual_loss(logits: torch.Tensor, peer_logits: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * CE(logits, y) + (1 - weight) * KL(softmax(peer) || softmax(logits))``, batch means.

    The peer's distribution is a target (detached): the loss moves only the model behind ``logits``.
    """
    log_p = F.log_softmax(logits, dim=1)
    log_q = F.log_softmax(peer_logits.detach(), dim=1)
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)  # sum_c q (log q - log p), mean over rows
    return weight * F.cross_entropy(logits, y) + (1.0 - weight) * kl


class FML(RoundStrategy):
    """Federated Mutual Learning: private models of any architecture, a shared meme model (Shen et al.).

    Parameters
    ----------
    alpha : float, default 0.5
        Weight of the private model's cross-entropy; ``1 - alpha`` weighs its KL towards the meme.
        1 trains the private model on its data alone (local training).
    beta : float, default 0.5
        Weight of the meme's cross-entropy; ``1 - beta`` weighs its KL towards the private model.
        1 trains the meme on the data alone (FedAvg, with a private model on the side).
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fml"
    personalised = True
    global_model = True
    model_heterogeneous = True

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        beta: float = 0.5,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        for key, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{key} must be in [0, 1] (the weight of the cross-entropy against the KL term; the paper uses "
                    f"0.5); got {value}"
                )
        self.alpha = alpha
        self.beta = beta

    def compute_steps(self, steps: int) -> int:
        return 2 * steps  # the private model and the meme each take ``steps`` steps (see the module docstring)

    @staticmethod
    def meme_trainer(trainer):
        """The trainer the meme trains in: the reference architecture's, or, when that is the client's own
        trainer (no zoo), a second instance of it."""
        return trainer.twin() if trainer.reference is trainer else trainer.reference

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        private, meme = trainer, self.meme_trainer(trainer)
        private.load(OwnModels.own_model(trainer, state))
        meme.load(task.params)
        opt_private, opt_meme = private.optimizer(), meme.optimizer()
        private_sum, meme_sum = torch.zeros((), device=trainer.device), torch.zeros((), device=trainer.device)
        what = "mutual learning of the private model and the meme"
        with private.training(seed, what), meme.training(seed, what):
            for batch in private.batches(data.n_samples, task.steps, seed):
                x, y = data.x[batch], data.y[batch]
                private.grad.zero_()
                meme.grad.zero_()
                private_logits, meme_logits = private.model(x), meme.model(x)
                private_loss = mutual_loss(private_logits, meme_logits, y, self.alpha)
                meme_loss = mutual_loss(meme_logits, private_logits, y, self.beta)
                (private_loss + meme_loss).backward()  # two separate graphs: the targets are detached
                opt_private.step()
                opt_meme.step()
                private_sum += private_loss.detach()
                meme_sum += meme_loss.detach()
        steps = max(task.steps, 1)
        private_mean, meme_mean = private_sum.item() / steps, meme_sum.item() / steps
        if not (math.isfinite(private_mean + meme_mean) and torch.isfinite(private.flat).all()
                and torch.isfinite(meme.flat).all()):
            raise DivergedError(
                f"training diverged (private loss {private_mean}, meme loss {meme_mean}); lower training.lr or "
                "check the data normalisation"
            )
        state["model"] = private.flat.clone()
        return ClientResult(meme.flat.clone(), task.steps, meme_mean, stats={"private_loss": private_mean})

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        return OwnModels.own_model(trainer, state)

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        return weighted_mean(updates)

