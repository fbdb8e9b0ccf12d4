"""FedAMD: anchor sampling for partial client participation.

Wu, Guo, Qu, He, Liu and Gao, "Anchor Sampling for Federated Learning with Partial Client Participation",
ICML 2023 (arXiv:2206.05891), Algorithm 1 with a constant anchor probability.

From the paper: every client i has a *bullseye* v_i, a large-batch gradient of its loss; the server keeps the
global target v = (1/N) sum_i v_i. In round t each participant is, independently with probability p, an
*anchor*, otherwise a *miner*:

- an anchor computes v_i <- grad f_i(x_t; B_i) on a large batch B_i at the global model x_t and sends it; it
  does not change the model;
- a miner runs K small-batch steps from x_{t,0} = x_t, corrected recursively by the target (a SARAH-style
  estimator started at v):

      d_0 = v,   x_{t,1} = x_{t,0} - eta_l d_0
      d_k = d_{k-1} + grad f_i(x_{t,k}; b_k) - grad f_i(x_{t,k-1}; b_k),   x_{t,k+1} = x_{t,k} - eta_l d_k

  (both gradients of step k on the same mini-batch b_k), and sends x_{t,K};

the server moves by the miners' mean change, x_{t+1} = x_t + eta_g * mean_miners(x_{t,K} - x_t), and replaces
the anchors' bullseyes, so the next round's target includes them.

Our choices:

- The authors' code computes every client's bullseye once at the initial model before training starts, outside
  the rounds. hetfl charges all work to tasks, so until some bullseye is known every participant of a round is an
  anchor (the first round moves no model), and the target is the mean over the clients that have a bullseye
  (all N once each has been an anchor; the paper's 1/N over all clients).
- The large batch: ``anchor_batch`` samples drawn without replacement with the task's seed; None (the default, as
  the authors' full-batch runs) is the client's whole training set.
- Miners' changes are averaged uniformly, as in the paper's objective (1/N) sum_i f_i and the authors' code.
- Cost: an anchor's task has ``steps = ceil(|B_i| / training.batch_size)``, the batch-sized gradients its large
  batch costs (``strategy.partial_work`` may cut them, and the batch with them); a miner computes two gradients
  on each of its steps after the first, ``task_flops`` charges
  ``2 (K - 1)`` batch gradients. So anchors' compute time and ``train_flops`` are their real work.
- Local optimiser: the update above is plain SGD with learning rate ``training.lr``; momentum and Adam are
  refused (as SCAFFOLD does), ``training.weight_decay`` is not applied by the miners.
- Bullseyes are kept per client in the engine's per-client store (table ``fedamd/bullseye``, under
  ``training.state_memory_mb``), with their running sum, so a round costs O(participants), not O(N).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch

from hetfl.errors import ConfigError, DivergedError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy
from hetfl.strategies.selection import Selection
from hetfl.training.local import task_loss


def batch_gradient(trainer, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(grad of the mean loss on (x, y) at ``params`` as a flat vector, the loss); the model in ``train`` mode is
    the caller's business (:meth:`LocalTrainer.training`). Buffer entries of the gradient are zero."""
    trainer.load(params)
    trainer.grad.zero_()
    loss = task_loss(trainer.model(x), y)
    loss.backward()
    return trainer.grad.clone(), float(loss.detach())


def miner_steps(trainer, start: torch.Tensor, target: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """FedAMD's miner: ``steps`` recursive-gradient steps from ``start`` (see the module docstring). Returns the
    final flat vector and the mean loss at the points where gradients were taken."""
    lr = trainer.cfg.lr
    nb = trainer.n_buffers
    twin = trainer.twin()  # the previous point's gradient, on its own copy of the model
    device = trainer.device
    x, y = x.to(device), y.to(device)
    current = start.to(device).clone()
    direction = target.to(device).clone()
    losses: list[float] = []
    with trainer.training(seed, "a FedAMD miner step"), twin.training(seed, "a FedAMD miner step"):
        previous = None
        for k, batch in enumerate(trainer.batches(x.shape[0], steps, seed)):
            if k > 0:
                g_new, loss = batch_gradient(trainer, current, x[batch], y[batch])
                g_old, _ = batch_gradient(twin, previous, x[batch], y[batch])
                direction = direction + g_new - g_old
                current = trainer.flat.clone()  # buffers as the forward pass left them
                losses.append(loss)
            previous = current
            current = current.clone()
            current[nb:] -= lr * direction[nb:]
        if not losses:  # one step: no gradient was needed; report the loss at the start on the first batch
            with torch.no_grad():
                trainer.load(start.to(device))
                first = next(iter(trainer.batches(x.shape[0], 1, seed)))
                losses.append(float(task_loss(trainer.model(x[first]), y[first])))
    mean_loss = sum(losses) / len(losses)
    if not math.isfinite(mean_loss) or not torch.isfinite(current).all():
        raise DivergedError(f"training diverged (loss {mean_loss}); lower training.lr or check the data normalisation")
    return current, mean_loss


class FedAMD(RoundStrategy):
    """Anchor sampling: anchors refresh large-batch gradients, miners take target-corrected local steps.

    Parameters
    ----------
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    anchor_prob : float, default 0.2
        p, the probability that a participant is an anchor in a round (the authors' default).
    anchor_batch : int or None, default None
        Samples in an anchor's large batch; None: its whole training set.
    server_lr : float, default 1.0
        eta_g, the server step on the miners' mean change.
    """

    name = "fedamd"

    def __init__(
        self,
        *,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
        anchor_prob: float = 0.2,
        anchor_batch: int | None = None,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if not 0 <= anchor_prob <= 1:
            raise ValueError(f"anchor_prob must be in [0, 1], got {anchor_prob}")
        if anchor_batch is not None and anchor_batch < 1:
            raise ValueError("anchor_batch must be at least 1 (or None for the whole local training set)")
        if server_lr <= 0:
            raise ValueError("server_lr must be positive")
        self.anchor_prob = anchor_prob
        self.anchor_batch = anchor_batch
        self.server_lr = server_lr
        self.bullseyes: MutableMapping[int, torch.Tensor] = {}  # client -> v_i
        self._sum: torch.Tensor | None = None  # sum_i v_i over the clients in bullseyes
        self.anchors = 0  # anchor tasks aggregated so far

    def check_training(self, optimizer: str, momentum: float) -> None:
        if optimizer != "sgd" or momentum != 0:
            raise ConfigError("training.optimizer: fedamd's miners take plain SGD steps (training.optimizer=sgd, "
                              "training.momentum=0)")

    def start(self, server: Server) -> None:
        store = getattr(server, "client_store", None)
        if store is not None:
            table = store.table("fedamd/bullseye")
            if table is not self.bullseyes:
                table.update(self.bullseyes)
                self.bullseyes = table
        super().start(server)

    def target(self) -> torch.Tensor | None:
        """v, the mean of the known bullseyes (None before any)."""
        return None if self._sum is None or not len(self.bullseyes) else self._sum / len(self.bullseyes)

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        target = self.target()
        draw = server.rng.random()  # one draw per participant, whatever the outcome: the stream stays aligned
        if target is None or draw < self.anchor_prob:
            n = server.num_samples(client_id)
            batch = n if self.anchor_batch is None else min(self.anchor_batch, n)
            steps = max(1, math.ceil(batch / server.trainer.cfg.batch_size))
            return {"steps": steps, "options": {"anchor": 1.0, "batch": float(batch)}}
        return {"payload": {"target": target}, "options": {"anchor": 0.0}}

    def task_flops(self, server: Server, task: Task) -> float:
        if task.options.get("anchor"):
            return task.steps * server.step_flops(task.client_id)  # |B_i| / b batch gradients
        return 2 * max(task.steps - 1, 0) * server.step_flops(task.client_id)  # two gradients a step after the first

    def expected_payload(self, server: Server, task: Task) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if task.options.get("anchor"):
            return {"bullseye": (tuple(task.params.shape), task.params.dtype)}
        return {}

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        if task.options.get("anchor"):
            # partial work may have cut the task's batch gradients to those that arrive in time: the batch shrinks
            n, batch = data.n_samples, min(int(task.options["batch"]), task.steps * trainer.cfg.batch_size)
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch] if batch < n else None
            x, y = (data.x, data.y) if rows is None else (data.x[rows], data.y[rows])
            with trainer.training(seed, "a FedAMD anchor's large-batch gradient"):
                grad, loss = batch_gradient(trainer, task.params.to(trainer.device), x.to(trainer.device),
                                            y.to(trainer.device))
            if not (math.isfinite(loss) and torch.isfinite(grad).all()):
                raise DivergedError(f"training diverged (loss {loss}); lower training.lr or check the data normalisation")
            return ClientResult(task.params, task.steps, loss, payload={"bullseye": grad}, stats={"anchor": 1.0})
        params, loss = miner_steps(trainer, task.params, task.payload["target"], data.x, data.y, steps=task.steps,
                                   seed=seed)
        return ClientResult(params, task.steps, loss, stats={"anchor": 0.0})

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        miners = [u for u in updates if not u.stats.get("anchor")]
        for u in updates:
            if u.stats.get("anchor"):
                new = u.payload["bullseye"]
                old = self.bullseyes.get(u.client_id)
                self._sum = (new.clone() if self._sum is None else self._sum + new) - (0 if old is None else old)
                self.bullseyes[u.client_id] = new
                self.anchors += 1
        if not miners:
            return server.params
        mean_delta = torch.stack([u.delta for u in miners]).mean(0)
        return self.server_step(server, mean_delta, self.server_lr * mean_delta)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "anchors": float(self.anchors), "bullseyes": float(len(self.bullseyes))}

