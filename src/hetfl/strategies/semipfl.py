"""SemiPFL: personalised semi-supervised FL: a server hypernetwork gives each client its own encoder, trained
as an autoencoder on its unlabelled samples; a few labels choose and fine-tune a classifier on top.

Tashakori, Zhang, Wang and Servati, "SemiPFL: Personalized Semi-Supervised Federated Learning Framework for Edge
Intelligence", IEEE Internet of Things Journal 2023 (arXiv:2203.08176); the authors' code is
github.com/arvintashakori/SemiPFL (read as facts only).

From the paper: clients hold few labelled and many unlabelled samples. The server trains a hypernetwork
h(e_i; phi) that maps a client's learned embedding e_i to the weights of the client's personalised autoencoder.
A client trains the autoencoder it received on its own (unlabelled) samples by reconstruction and sends the
change back; the server updates phi and e_i as pFedHN does (Shamsian et al., arXiv:2103.04628): with
theta_i = h(e_i; phi) and the client's result theta~_i, the gradient of phi is (d theta_i / d phi)^T
(theta_i - theta~_i). The server then produces a set of base models (classifiers on the client's encoding) and
sends them; the client aggregates them locally using its labelled samples and fine-tunes the result on them, with
its encoder frozen. The personal model is the client's encoder followed by that classifier.

Our choices, at hetfl's scale:

- The encoder is the model's body (everything before the head, :mod:`hetfl.models.zoo`'s head protocol) and the
  decoder a linear map from the representation back to the input, ``x^ = D h + c``, kept on the client (the paper's
  hypernetwork generates the whole autoencoder; only the encoder is used for classification, so only it is
  personalised by the server here).
- The hypernetwork is linear: theta_i = b + A e_i with e_i in R^k (``embedding_dim``), b the shared body (the
  server's ``params``), A a P x k matrix (P body entries), A = 0 and e_i ~ N(0, I) at the start. Its pFedHN
  gradient is closed-form; for the round's updates with sample weights p_i and g_i = theta_i - theta~_i:

      b <- b - eta sum_i p_i g_i,     A <- A - eta_e sum_i p_i g_i e_i^T,     e_i <- e_i - eta_e A^T g_i

  (A^T of the A before the step). With eta = 1 and A = 0, b follows FedAvg of the clients' autoencoder encoders.
  The bilinear part (A, e_i) diverges at step sizes near 1, so it has its own, small, eta_e (pFedHN's
  hypernetwork learns at 1e-2).
- Base models: hetfl's server holds no labelled data (the paper's server trains base models on its own labelled
  set), so the base models are the heads the clients fine-tuned in their last tasks: a client receives the
  ``base_models`` heads of the clients nearest to it in embedding space (Euclidean distance between the e_i, its own
  last head first when it has one; the initial head where fewer exist). It aggregates them with weights
  softmax(-L_j / temperature), L_j the cross-entropy of base model j on its labelled samples under its encoder,
  then fine-tunes the mixture (``finetune_steps`` steps, head only) and sends it back.
- Every task runs ``steps`` autoencoder steps (plain SGD at ``training.lr``, on all its samples, labelled
  and unlabelled, with its own batch order) and ``finetune_steps`` head steps (``training.optimizer``); both are
  charged (``compute_steps``). A client without unlabelled samples trains the autoencoder on its labelled ones'
  features (never their labels).

What travels: down, the client's encoder theta_i (P floats) and the K base heads; up, theta~_i and its head.
Kept per client: its decoder and its personal model. The server keeps b, A, every e_i and every client's last head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hetfl.errors import ConfigError, DivergedError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, sample_weights
from hetfl.training.local import task_loss


def hypernet_step(
    b: torch.Tensor, a: torch.Tensor, e: torch.Tensor, clients: list[int], g: torch.Tensor, p: torch.Tensor, lr: float,
    embedding_lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pFedHN step of the linear hypernetwork theta_i = b + A e_i, for the round's clients ``clients`` with
    g_i = theta_i - theta~_i (rows of ``g``) and weights ``p``: the new (b, A, E) (E: every client's e_i as rows);
    ``lr`` steps b, ``embedding_lr`` A and the e_i."""
    rows = e[clients]  # (m, k)
    new_e = e.clone()
    new_e[clients] = rows - embedding_lr * g @ a  # e_i - eta_e A^T g_i, with the A before the step
    weighted = g * p.unsqueeze(1)  # (m, P)
    return b - lr * weighted.sum(0), a - embedding_lr * weighted.T @ rows, new_e


def mix_heads(losses: torch.Tensor, heads: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_j w_j head_j with w = softmax(-losses / temperature): the client's aggregation of its base models."""
    return torch.softmax(-losses / temperature, 0) @ heads


class SemiPFL(RoundStrategy):
    """SemiPFL: a hypernetwork of personalised autoencoder encoders, base classifiers mixed by labelled loss
    (Tashakori et al., arXiv:2203.08176).

    Parameters
    ----------
    embedding_dim : int, default 4
        k, the size of each client's hypernetwork embedding e_i.
    hn_lr : float, default 1.0
        eta, the step size of the hypernetwork's shared part b (1 with A = 0: FedAvg of the encoders).
    embedding_lr : float, default 0.01
        eta_e, the step size of A and the client embeddings e_i.
    base_models : int, default 3
        K, how many base classifier heads a client receives and mixes.
    temperature : float, default 1.0
        Temperature of the softmax over the base models' labelled losses.
    finetune_steps : int or None, default None
        Head fine-tuning steps on the labelled samples per task; None: the task's ``steps``.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "semipfl"
    personalised = True
    global_model = False

    def __init__(
        self,
        *,
        embedding_dim: int = 4,
        hn_lr: float = 1.0,
        embedding_lr: float = 0.01,
        base_models: int = 3,
        temperature: float = 1.0,
        finetune_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # RoundStrategy's: clients_per_round, deadline_s, selection
        if embedding_dim < 1:
            raise ValueError("embedding_dim must be at least 1")
        if hn_lr <= 0:
            raise ValueError("hn_lr must be positive")
        if embedding_lr < 0:
            raise ValueError("embedding_lr must be non-negative (0: no personalised encoders)")
        if base_models < 1:
            raise ValueError("base_models must be at least 1")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if finetune_steps is not None and finetune_steps < 0:
            raise ValueError("finetune_steps must be non-negative (or None for the task's steps)")
        self.embedding_dim = embedding_dim
        self.hn_lr = hn_lr
        self.embedding_lr = embedding_lr
        self.base_models = base_models
        self.temperature = temperature
        self.finetune_steps = finetune_steps
        self._a: torch.Tensor | None = None  # A (P x k); None before start
        self._e: torch.Tensor | None = None  # every e_i (n x k)
        self._heads: dict[int, torch.Tensor] = {}  # each client's last fine-tuned head

    # -- the server half ------------------------------------------------------------------------
    def check_models(self, trainers) -> None:
        for t in trainers:
            t.require_head(self.name)
            if t.body_slice.start == t.body_slice.stop:
                raise ConfigError(f"{t.key}: semipfl trains the body as an autoencoder's encoder, and {t.label} is the "
                                  "head alone; use mlp or cnn, or set model.feature_dim")

    def initial_params(self, trainer) -> torch.Tensor:
        return trainer.initial[trainer.body_slice].clone()  # b: the shared encoder

    def compute_steps(self, steps: int) -> int:
        return steps + (steps if self.finetune_steps is None else self.finetune_steps)

    def start(self, server: Server) -> None:
        if self._e is None:
            self._a = torch.zeros(server.params.numel(), self.embedding_dim)
            self._e = torch.from_numpy(server.rng.standard_normal((server.n_clients, self.embedding_dim))).float()
        super().start(server)

    def _base_heads(self, server: Server, client: int) -> torch.Tensor:
        """The K heads client ``client`` mixes: its own last head first, then those of the clients nearest in e."""
        initial = server.trainer.initial[server.trainer.head_slice]
        others = [c for c in self._heads if c != client]
        if others:
            distance = torch.cdist(self._e[[client]], self._e[others])[0]
            others = [others[i] for i in torch.argsort(distance, stable=True).tolist()]
        chosen = ([client] if client in self._heads else []) + others
        heads = [self._heads[c] for c in chosen[: self.base_models]]
        return torch.stack(heads + [initial] * (self.base_models - len(heads)))

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        encoder = server.params + self._a @ self._e[client_id]
        return {"payload": {"encoder": encoder, "heads": self._base_heads(server, client_id)}}

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        down = sum(t.numel() * t.element_size() for t in task.payload.values())
        head = task.payload["heads"][0]
        return down, (task.payload["encoder"].numel() + head.numel()) * head.element_size()

    def describe_transfer(self, trainer) -> str:
        body = trainer.initial[trainer.body_slice].numel()
        head = trainer.initial[trainer.head_slice].numel()
        return f"{(body + self.base_models * head) * 4 / 1e3:.1f} kB down, {(body + head) * 4 / 1e3:.1f} kB up a task"

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        head = task.payload["heads"][0]
        return {"head": (tuple(head.shape), head.dtype)}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        clients = [u.client_id for u in updates]
        g = torch.stack([u.task.payload["encoder"] - u.params for u in updates])
        b, self._a, self._e = hypernet_step(server.params, self._a, self._e, clients, g, sample_weights(updates),
                                            self.hn_lr, self.embedding_lr)
        for u in updates:
            self._heads[u.client_id] = u.payload["head"]
        return b

    # -- the client half ------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        body, head = trainer.body_slice, trainer.head_slice
        model = trainer.initial.clone() if state.get("model") is None else state["model"].clone()
        model[body] = task.payload["encoder"]
        unlabelled = data.x if data.x_unlabelled is None or not len(data.x_unlabelled) else \
            torch.cat([data.x, data.x_unlabelled])
        model, state["decoder"], ae_loss = self._autoencoder(trainer, model, unlabelled, state.get("decoder"), task.steps,
                                                             seed)
        steps = task.steps if self.finetune_steps is None else self.finetune_steps
        if len(data.y):
            model[head] = self._mixed_head(trainer, model, task.payload["heads"], data)
            if steps:
                mask = torch.zeros_like(model)
                mask[head] = 1
                tuned_seed = int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])
                model = trainer.train(model, data.x, data.y, steps=steps, seed=tuned_seed, grad_mask=mask).params
        state["model"] = model
        return ClientResult(model[body].clone(), task.steps, ae_loss, payload={"head": model[head].clone()})

    def _mixed_head(self, trainer, model: torch.Tensor, heads: torch.Tensor, data: ClientData) -> torch.Tensor:
        with torch.no_grad():
            trainer.load(model)
            features, _ = trainer.features(data.x)
            n_classes, d = trainer.head.out_features, trainer.head.in_features
            losses = torch.stack([
                task_loss(features @ h[: n_classes * d].reshape(n_classes, d).T + h[n_classes * d :], data.y)
                for h in heads
            ])
        return mix_heads(losses, heads, self.temperature)

    @staticmethod
    def _autoencoder(trainer, model: torch.Tensor, x: torch.Tensor, decoder: torch.Tensor | None, steps: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``steps`` SGD steps of mean squared reconstruction error ||D h(x) + c - x||^2 on the body and the linear
        decoder ``[D (F x d) row-major, c (F)]`` (F input features): the model, the decoder and the mean loss."""
        flat_x = x.reshape(len(x), -1)
        n_features, d = flat_x.shape[1], trainer.head.in_features
        if decoder is None:  # a seeded small random decoder (a zero one would pass no gradient to the encoder)
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 3]).generate_state(1)[0]))
            decoder = torch.cat([torch.randn(n_features * d, generator=gen) / d**0.5, torch.zeros(n_features)])
        dec = decoder.clone().to(trainer.device).requires_grad_(True)
        trainer.load(model)
        body = trainer.body_slice
        lr, total = trainer.cfg.lr, 0.0
        with trainer.training(seed, "autoencoder training"):
            for batch in trainer.batches(len(x), steps, seed):
                trainer.grad.zero_()
                dec.grad = None
                features, _ = trainer.features(x[batch])
                w, c = dec[: n_features * d].reshape(n_features, d), dec[n_features * d :]
                loss = F.mse_loss(features @ w.T + c, flat_x[batch])
                loss.backward()
                with torch.no_grad():
                    trainer.flat[body] -= lr * trainer.grad[body]
                    dec -= lr * dec.grad
                total += float(loss.detach())
        if not np.isfinite(total):
            raise DivergedError(f"semipfl: autoencoder training diverged (loss {total}); lower training.lr")
        return trainer.flat.clone(), dec.detach().cpu(), total / max(steps, 1)

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        model = state.get("model")
        if model is None:  # never trained: the shared encoder and the initial head
            model = trainer.initial.clone()
            model[trainer.body_slice] = params
        return model

