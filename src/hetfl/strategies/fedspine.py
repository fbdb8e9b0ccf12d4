"""FedSpine: structured pruning plus LoRA, with a per-device bandit choosing (pruning ratio, LoRA rank).

Yao et al., "Efficient Deployment of Large Language Models on Resource-constrained Devices"
(arXiv:2501.02438): devices iteratively prune the base model structurally and tune LoRA on what remains;
an online multi-armed bandit per device picks the pruning ratio and the LoRA rank without prior knowledge
of the device's capability. The paper's abstract names neither the bandit nor the reward; hetfl's choices
are below, all built on :class:`~hetfl.strategies.fedlora.FedLoRA` (HetLoRA aggregation) and the tested
libraries :mod:`hetfl.models.pruning` and :mod:`hetfl.strategies.bandit`.

Arms. Every pair ``(ratio, rank)`` of ``ratios`` x ``ranks``, ratio-major (arm ``i * len(ranks) + j`` is
``(ratios[i], ranks[j])``). Each client has its own bandit (``bandit``: UCB1, or EXP3), created at its first
dispatch. With ``arm`` (a baseline without the bandit) every device trains that one arm where it fits its
memory; a device it does not fit trains the arm of the same rank with the smallest larger ratio that fits
(else its smallest feasible arm).

Memory. An arm's training memory is :func:`~hetfl.models.pruning.memory_bytes` of the base pruned at its
ratio with adapters of its rank on ``targets`` (batch ``training.batch_size``, the data's context, Adam's
two moments or SGD's momentum). An arm above a device's ``memory_bytes`` (``devices.memory``) is masked out of
its bandit, so it is never dispatched; a device no arm fits is a one-line ConfigError before the run
(``check_devices``).

The server half. At dispatch the client's bandit picks a feasible arm; the task carries ``ratio``, ``rank``
and ``arm`` in ``task.options``. On arrival the arm earns :func:`~hetfl.strategies.bandit.fedspine_reward`
of the client's validation-loss gain and the simulated seconds the task took (arrival minus dispatch, as the
engine timed it): ``1 - exp(-(gain / seconds**time_exponent) / rate_scale)``; ``rate_scale`` defaults to the
first positive rate any client reports. A task the round's deadline cancels earns 0 (the reward's
deadline rule); a task lost to dropout or going offline earns nothing (it says nothing about the arm).
Aggregation is FedLoRA's ``hetlora`` unchanged: the server keeps adapters of rank ``max(ranks)`` on the full
model.

The client half (one task)::

    adapters  = the server's adapters truncated to the task's rank (full dimensions)
    before    = validation loss of  base + adapters                    (the model it downloaded)
    keep      = heads and FFN channels to keep (below), counts kept(n, ratio) per layer
    small     = prune(base, keep)                  a physically smaller TinyLM (hetfl.models.pruning)
    train     the adapters, sliced to ``keep``, for the task's steps on small (base frozen; FedLoRA's loop)
    after     = validation loss of  small + adapters
    send      the adapters mapped back to full dimensions, zero in pruned rows/columns; stats gain = before - after

Validation is the last ``val_fraction`` of the client's windows (held out of training; a client with one
window validates on it). Which heads/channels to keep: first-order Taylor importance
(:func:`~hetfl.models.pruning.importance`) on up to ``score_rows`` of the client's training windows, of the
base with the downloaded adapters merged. Iterative pruning (``iterative``, FedSpine's prune-then-tune loop):
the client's kept sets persist in its state, and a task whose ratio keeps no more than the client already
has prunes further *within* them, scoring the already-pruned model (so its sets are nested, each prune
taking the earlier ones into account); a task of a lower ratio (a bigger model) restores the full base from
the device's storage and prunes it once. The count kept is always the arm's, so an arm means one model
size, which the memory mask and the cost need. Pruning reads the base the client stores, never the trained
adapters' updates to it (they travel to the server; the base stays frozen as in FedLoRA).

Mapping adapters back (what makes heterogeneous pruning aggregatable): a pruned head removes its ``d_head``
rows of q, k, v (rows of their ``B``) and columns of o (columns of o's ``A``); a pruned FFN channel removes
its row of fc1 (a row of ``B``) and column of fc2 (a column of ``A``). The upload puts zeros there, and the
HetLoRA mean averages them with the other clients' values, exactly as it averages zero-padded rank
components (shrinking a position by the weight of the clients that pruned it).

Evaluation. As hetlora (``global_model`` False): each client's own model, its pruned base plus the server's
adapters truncated to its last rank and sliced to its kept sets, written in the full architecture with the
pruned heads' columns of o and the pruned channels' columns of fc2 set to zero (the same function as the
pruned model; a client that never trained is scored with the full base and rank ``max(ranks)``).

Bytes. Down: the rank-r truncation of the server's adapters (full dimensions: the client prunes locally).
Up: the nonzero part only, rank-r adapters of the pruned dimensions (the kept index sets, a few integers,
are not counted).

Cost. :meth:`task_flops` is a task's FLOPs: ``compute_steps(steps)`` times 3 x the forward FLOPs of a batch
of the pruned model plus its adapters (``2 * context * rank * (d_in + d_out)`` per adapted layer and
sample); a client with fewer windows than a batch is charged the batch it has
(:func:`~hetfl.models.cost.batch_share`). The engine asks it at dispatch, so a pruned, low-rank task takes less
simulated time and counts fewer ``train_flops`` than a full one.

Reports. ``metrics()``: the share of dispatched tasks per arm (``fedspine_arm_r{ratio}_k{rank}``), and the
mean parameter count of the devices' current pruned models. ``history`` (client id -> one dict per
arrival or cancellation: the version the task started from, time, ratio, rank, gain, seconds, reward) and
:meth:`device_report` (per device: its arm, its final pruned model's parameter count, the arm's training
memory and the model's measured inference latency) go to ``summary.json`` (``strategy_summary``, from
:meth:`summary`: ``choices`` and ``devices``, by client id).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
import torch

from hetfl.errors import ConfigError
from hetfl.models.cost import batch_share, flops_per_sample, training_flops
from hetfl.models.lora import truncate
from hetfl.models.pruning import Importance, importance, inference_latency, kept, memory_bytes, param_count, prune
from hetfl.models.transformer import TinyLM
from hetfl.strategies.bandit import EXP3, UCB1, Bandit, fedspine_reward
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.fedlora import LM_TARGETS, FedLoRA, Layer, target_layers
from hetfl.strategies.selection import Selection
from hetfl.training.local import LocalTrainer, task_loss

Keep = tuple[list[torch.Tensor], list[torch.Tensor]]  # kept head indices, kept channel indices, per layer


def to_model(trainer, flat: torch.Tensor) -> TinyLM:
    """A standalone TinyLM of ``trainer``'s architecture holding a copy of ``flat`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        model = TinyLM(**trainer.model.sizes())
    torch.nn.utils.vector_to_parameters(flat.clone(), model.parameters())
    return model


def _indicator(keep: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    out = []
    for k, n in zip(keep, sizes):
        s = torch.zeros(n)
        s[k] = 1.0
        out.append(s)
    return out


def restrict(model: TinyLM, ratio: float, keep: Keep) -> TinyLM:
    """``model`` pruned to exactly the heads and channels ``keep`` (``kept(n, ratio)`` of each, full-model indices)."""
    heads = [b.attn.n_heads for b in model.blocks]
    chans = [b.ff.fc1.out_features for b in model.blocks]
    return prune(model, ratio, Importance(heads=_indicator(keep[0], heads), channels=_indicator(keep[1], chans)))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The pruning rule of hetfl.models.pruning: the ``k`` highest scores, ties to the lower index, in index order."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


class FedSpine(FedLoRA):
    """FedSpine: per-device (pruning ratio, LoRA rank) chosen by an online bandit under memory limits.

    Parameters
    ----------
    ratios : list of float, default [0.0, 0.25, 0.5]
        Pruning ratios the bandits choose from, each in [0, 1) (share of heads and FFN channels removed per layer).
    ranks : list of int, default [2, 4, 8]
        LoRA ranks the bandits choose from; the server keeps adapters of the largest.
    bandit : {"ucb1", "exp3"}, default "ucb1"
        The per-device bandit (:mod:`hetfl.strategies.bandit`).
    ucb_c : float, default 1.0
        UCB1's exploration constant.
    exp3_gamma : float, default 0.1
        EXP3's exploration rate.
    rate_scale : float, optional
        The reward's rate scale (loss per second that earns ``1 - 1/e``); default: the first positive rate seen.
    time_exponent : float, default 1.0
        The reward's time exponent (0: gain alone; 1: gain per second).
    arm : [ratio, rank], optional
        A fixed arm instead of the bandits (module docstring, Arms); it must be one of ``ratios`` x ``ranks``.
    iterative : bool, default True
        Prune further within the client's kept heads/channels when the ratio allows (module docstring).
    val_fraction : float, default 0.2
        Share of each client's windows held out to measure its gain.
    score_rows : int, default 32
        Training windows the Taylor importance is computed on.
    targets : list of str, optional
        Linear layers with adapters (default q and v).
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "fedspine"

    def __init__(
        self,
        *,
        ratios: list[float] | None = None,
        ranks: list[int] | None = None,
        bandit: Literal["ucb1", "exp3"] = "ucb1",
        ucb_c: float = 1.0,
        exp3_gamma: float = 0.1,
        rate_scale: float | None = None,
        time_exponent: float = 1.0,
        arm: list[float] | None = None,
        iterative: bool = True,
        val_fraction: float = 0.2,
        score_rows: int = 32,
        targets: list[str] | None = None,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        ratios = [0.0, 0.25, 0.5] if ratios is None else list(ratios)
        ranks = [2, 4, 8] if ranks is None else list(ranks)
        if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
            raise ValueError(f"ratios must list pruning ratios in [0, 1) (e.g. [0, 0.25, 0.5]); got {ratios}")
        if not ranks or min(ranks) < 1:
            raise ValueError(f"ranks must list positive LoRA ranks (e.g. [2, 4, 8]); got {ranks}")
        if bandit not in ("ucb1", "exp3"):
            raise ValueError(f"bandit must be ucb1 or exp3; got {bandit!r}")
        if ucb_c < 0 or not 0.0 < exp3_gamma <= 1.0:
            raise ValueError(f"ucb_c must be >= 0 and exp3_gamma in (0, 1]; got {ucb_c}, {exp3_gamma}")
        if rate_scale is not None and rate_scale <= 0:
            raise ValueError(f"rate_scale must be positive (or unset); got {rate_scale}")
        if time_exponent < 0:
            raise ValueError(f"time_exponent must be non-negative; got {time_exponent}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
        if score_rows < 1:
            raise ValueError(f"score_rows must be at least 1; got {score_rows}")
        super().__init__(aggregation="hetlora", rank=max(ranks), targets=targets, clients_per_round=clients_per_round,
                         deadline_s=deadline_s, selection=selection)
        self.ratios, self.arm_ranks = sorted(set(ratios)), sorted(set(ranks))
        self.arms: list[tuple[float, int]] = [(r, k) for r in self.ratios for k in self.arm_ranks]
        if arm is not None and (len(arm) != 2 or (float(arm[0]), arm[1]) not in self.arms):
            raise ValueError(f"arm must be [ratio, rank] with the ratio in ratios {self.ratios} and the rank in ranks "
                             f"{self.arm_ranks}; got {arm}")
        self.fixed = None if arm is None else (float(arm[0]), int(arm[1]))
        self.bandit, self.ucb_c, self.exp3_gamma = bandit, ucb_c, exp3_gamma
        self.rate_scale, self.time_exponent = rate_scale, time_exponent
        self.iterative, self.val_fraction, self.score_rows = iterative, val_fraction, score_rows
        self._scale = rate_scale
        self._bandits: dict[int, Bandit] = {}
        self._chosen = np.zeros(len(self.arms), dtype=np.int64)  # dispatches per arm, all clients
        self._params: dict[int, int] = {}  # each client's current pruned model's parameter count
        self.history: dict[int, list[dict[str, float]]] = {}
        self._arm_memory: np.ndarray | None = None  # per arm: training bytes, FLOPs of a step, bytes up
        self._arm_flops: list[float] = []
        self._arm_up: list[int] = []

    # -- arms: memory, cost, bytes -------------------------------------------------------------------
    def check_model(self, model_name: str) -> None:
        if model_name != "tinylm":
            raise ConfigError(f"model.name: fedspine prunes TinyLM heads and channels; set model.name: tinylm "
                              f"(got {model_name})")

    def check_models(self, trainers) -> None:
        super().check_models(trainers)
        self.setup(trainers[0].reference)

    def setup(self, trainer) -> None:
        """Each arm's training memory, FLOPs of a step and upload bytes, from the reference architecture."""
        if self._arm_memory is not None:
            return
        if not isinstance(trainer.model, TinyLM):
            self.check_model(type(trainer.model).__name__.lower())
        with torch.random.fork_rng(devices=[]):
            ref = TinyLM(**trainer.model.sizes())
        cfg = trainer.cfg
        states = 2 if cfg.optimizer == "adam" else int(cfg.momentum > 0)
        targets = self.targets or LM_TARGETS
        memory = []
        for ratio, rank in self.arms:
            small = prune(ref, ratio)  # magnitude scores: only the sizes matter here
            layers = target_layers(small, self.targets)
            memory.append(memory_bytes(small, rank, cfg.batch_size, ref.context, targets=targets,
                                       optimizer_states=states))
            forward = flops_per_sample(small, (ref.context,), token_input=True)
            forward += 2 * ref.context * rank * sum(layer.d_in + layer.d_out for layer in layers)
            self._arm_flops.append(training_flops(forward, cfg.batch_size))
            self._arm_up.append(4 * self.adapter_numel(layers, rank))
        self._arm_memory = np.asarray(memory, dtype=np.float64)

    def arm_memory(self) -> np.ndarray:
        """Training bytes of each arm (after :meth:`setup`)."""
        assert self._arm_memory is not None, "setup(trainer) first"
        return self._arm_memory

    def feasible(self, profile: Any) -> np.ndarray:
        """The arms that fit the device's memory (``profile.memory_bytes``; unlimited if it has none)."""
        return self.arm_memory() <= getattr(profile, "memory_bytes", math.inf)

    def _no_arm_fits(self, profile: Any) -> ConfigError:
        small = int(np.argmin(self.arm_memory()))
        ratio, rank = self.arms[small]
        return ConfigError(
            f"devices.memory: device {profile.client_id} ({profile.tier}) has {profile.memory_bytes:.4g} bytes and the "
            f"smallest fedspine arm (ratio {ratio:g}, rank {rank}) needs {self.arm_memory()[small]:.4g} to train; "
            "raise the device's memory, or add a higher strategy.params.ratios or a lower rank"
        )

    def check_devices(self, profiles: list[Any]) -> None:
        if self._arm_memory is None:
            return  # setup runs in check_models, which the federation calls first
        for profile in profiles:
            if not self.feasible(profile).any():
                raise self._no_arm_fits(profile)

    def task_flops(self, server: Server, task: Task) -> float:
        """FLOPs of ``task`` on its pruned model with its rank (module docstring, Cost)."""
        self.setup(server.trainer)
        share = batch_share(server.trainer.cfg.batch_size, server.num_samples(task.client_id))  # a client short of a batch
        return self.compute_steps(task.steps) * self._arm_flops[task.options["arm"]] * share

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        self.setup(server.trainer)
        down = 4 * self.adapter_numel(self.layers(server.trainer), task.options["rank"])
        return down, self._arm_up[task.options["arm"]]

    def describe_transfer(self, trainer) -> str:
        """Down: full-dimension adapters of the arm's rank; up: the pruned model's adapters (module docstring)."""
        self.setup(trainer)
        layers = self.layers(trainer)
        lo, hi = self.arm_ranks[0], self.arm_ranks[-1]
        down = [4 * self.adapter_numel(layers, r) / 1e3 for r in (lo, hi)]
        span = f"rank {lo}" if lo == hi else f"rank {lo}-{hi}"
        return (f"adapters of {span}, {down[0]:.1f}-{down[1]:.1f} kB down, {min(self._arm_up) / 1e3:.1f}-"
                f"{max(self._arm_up) / 1e3:.1f} kB up (pruned)")

    # -- the server half -----------------------------------------------------------------------------
    def bandit_of(self, client_id: int) -> Bandit:
        if client_id not in self._bandits:
            self._bandits[client_id] = (UCB1(arms=self.arms, c=self.ucb_c) if self.bandit == "ucb1"
                                        else EXP3(arms=self.arms, gamma=self.exp3_gamma))
        return self._bandits[client_id]

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        self.setup(server.trainer)
        profile = server.profiles[client_id]
        feasible = self.feasible(profile)
        if not feasible.any():
            raise self._no_arm_fits(profile)
        arm = self.bandit_of(client_id).select(server.rng, feasible) if self.fixed is None else self.fixed_arm(feasible)
        self._chosen[arm] += 1
        ratio, rank = self.arms[arm]
        return {"options": {"rank": rank, "ratio": ratio, "arm": arm}}

    def fixed_arm(self, feasible: np.ndarray) -> int:
        """``arm`` where it is ``feasible``, else the arm of its rank with the smallest larger ratio that is, else
        the feasible arm of least memory."""
        ratio, rank = self.fixed
        fits = [i for i, (r, k) in enumerate(self.arms) if feasible[i] and k == rank and r >= ratio]
        return fits[0] if fits else int(np.argmin(np.where(feasible, self.arm_memory(), np.inf)))

    def reward(self, gain: float, seconds: float) -> float:
        """The arm's reward for a task of validation-loss ``gain`` that took ``seconds`` (module docstring)."""
        rate = max(gain, 0.0) / seconds**self.time_exponent
        if self._scale is None and rate > 0:
            self._scale = rate
        return fedspine_reward(gain, seconds, rate_scale=self._scale or 1.0, time_exponent=self.time_exponent,
                               deadline_s=self.deadline_s)

    def _record(self, client_id: int, task: Task, at: float, gain: float, seconds: float, reward: float) -> None:
        self.bandit_of(client_id).update(task.options["arm"], reward)
        self.history.setdefault(client_id, []).append(
            {"version": task.version, "t": at, "ratio": task.options["ratio"], "rank": int(task.options["rank"]),
             "gain": gain, "seconds": seconds, "reward": reward}
        )

    def on_update(self, server: Server, update: Update) -> None:
        seconds = max(update.arrived_at - update.task.dispatched_at, 1e-9)
        gain = float(update.stats["gain"])
        self._record(update.client_id, update.task, update.arrived_at, gain, seconds, self.reward(gain, seconds))
        self._params[update.client_id] = int(update.stats["params"])
        super().on_update(server, update)

    def on_timer(self, server: Server, tag: str) -> None:
        if tag == "deadline":  # the tasks about to be cancelled took too long: reward 0, before the next round picks
            for task in self._pending.values():
                self._record(task.client_id, task, server.now, 0.0, server.now - task.dispatched_at, 0.0)
        super().on_timer(server, tag)

    def metrics(self) -> dict[str, float]:
        total = max(int(self._chosen.sum()), 1)
        out = {f"fedspine_arm_r{ratio:g}_k{rank}": float(n) / total for (ratio, rank), n in zip(self.arms, self._chosen)}
        if self._params:
            out["fedspine_params_mean"] = float(np.mean(list(self._params.values())))
        return out

    # -- pruning and adapters in the client's coordinates -----------------------------------------------
    @staticmethod
    def pruned_dims(layer: Layer, keep: Keep, d_head: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The kept output rows and input columns of ``layer`` (None: all of them)."""
        parts = layer.name.split(".")
        if parts[0] != "blocks":
            return None, None
        block = int(parts[1])
        heads = (keep[0][block][:, None] * d_head + torch.arange(d_head)).reshape(-1)
        chans = keep[1][block]
        return {"q": (heads, None), "k": (heads, None), "v": (heads, None), "o": (None, heads),
                "fc1": (chans, None), "fc2": (None, chans)}.get(parts[-1], (None, None))

    def slice_adapters(self, layers: list[Layer], factors, keep: Keep, d_head: int):
        """Full-dimension adapters restricted to the kept rows (of B) and columns (of A)."""
        out = []
        for layer, (A, B) in zip(layers, factors):
            rows, cols = self.pruned_dims(layer, keep, d_head)
            out.append((A if cols is None else A[:, cols], B if rows is None else B[rows]))
        return out

    def expand_adapters(self, layers: list[Layer], factors, keep: Keep, d_head: int):
        """Adapters of the pruned model mapped back to the full ``layers``: zeros in the pruned rows/columns."""
        out = []
        for layer, (A, B) in zip(layers, factors):
            rows, cols = self.pruned_dims(layer, keep, d_head)
            A_full, B_full = torch.zeros(A.shape[0], layer.d_in), torch.zeros(layer.d_out, B.shape[1])
            A_full[:, slice(None) if cols is None else cols] = A
            B_full[slice(None) if rows is None else rows] = B
            out.append((A_full, B_full))
        return out

    def choose_kept(self, trainer, merged: torch.Tensor, ratio: float, state: dict[str, Any],
                    rows: torch.Tensor) -> Keep:
        """Heads and channels to keep at ``ratio`` (module docstring): nested in the client's sets when possible."""
        full = trainer.model
        n_h = [b.attn.n_heads for b in full.blocks]
        n_f = [b.ff.fc1.out_features for b in full.blocks]
        want_h, want_f = [kept(n, ratio) for n in n_h], [kept(n, ratio) for n in n_f]
        everything = ([torch.arange(n) for n in n_h], [torch.arange(n) for n in n_f])
        current = state.get("keep", everything)
        nested = self.iterative and all(w <= len(c) for w, c in zip(want_h + want_f, current[0] + current[1]))
        start = current if nested else everything
        if [len(c) for c in start[0] + start[1]] == want_h + want_f:
            return start  # nothing to remove (ratio 0, or the same count as before)
        model = to_model(trainer, merged)
        if start is not everything:
            model = restrict(model, state["ratio"], start)
        scores = importance(model, rows)
        return ([s[_top(x, w)] for s, x, w in zip(start[0], scores.heads, want_h)],
                [s[_top(x, w)] for s, x, w in zip(start[1], scores.channels, want_f)])

    def split(self, data: ClientData) -> tuple[ClientData, ClientData]:
        """(training, validation): the last ``val_fraction`` of the windows validate (all of them for one window)."""
        n = data.n_samples
        n_val = min(max(1, round(self.val_fraction * n)), n - 1) if self.val_fraction > 0 and n > 1 else 0
        if n_val == 0:
            return data, data
        cut = n - n_val
        return (ClientData(data.client_id, data.x[:cut], data.y[:cut]),
                ClientData(data.client_id, data.x[cut:], data.y[cut:]))

    @staticmethod
    @torch.no_grad()
    def loss_of(model: torch.nn.Module, data: ClientData) -> float:
        return float(task_loss(model(data.x), data.y))

    # -- the client half ------------------------------------------------------------------------------
    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        ratio, rank = float(task.options["ratio"]), int(task.options["rank"])
        layers = self.layers(trainer)
        d_head = trainer.model.d_head
        adapters = [truncate(A, B, rank) for A, B in self.unpack(layers, task.params, self.max_rank)]
        train, val = self.split(data)
        merged = self.merge(layers, trainer.initial, adapters)
        before = self.loss_of(to_model(trainer, merged), val)
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(train.n_samples, generator=g)[: self.score_rows]
        rows = torch.cat([train.x[pick], train.y[pick][:, -1:]], dim=1)
        keep = self.choose_kept(trainer, merged, ratio, state, rows)
        small = LocalTrainer(restrict(to_model(trainer, trainer.initial), ratio, keep), trainer.cfg, "tinylm-pruned")
        small_layers = self.layers(small)
        start = self.slice_adapters(layers, adapters, keep, d_head)
        base = small.flat.clone()
        factors, loss = self.train_adapters(small, small_layers, base, start, train, task.steps, seed)
        small.flat.copy_(self.merge(small_layers, base, factors))
        after = self.loss_of(small.model, val)
        state.update(keep=keep, ratio=ratio, rank=rank, params=param_count(small.model))
        state.setdefault("arms", []).append((ratio, rank))
        full = self.expand_adapters(layers, factors, keep, d_head)
        stats = {"rank": float(rank), "ratio": ratio, "gain": before - after, "params": float(param_count(small.model))}
        return ClientResult(self.pack(full), task.steps, loss, stats=stats)

    # -- evaluation and reports ------------------------------------------------------------------------
    def _offsets(self, trainer) -> dict[str, slice]:
        out, offset = {}, 0
        for name, p in trainer.model.named_parameters():
            out[name] = slice(offset, offset + p.numel())
            offset += p.numel()
        return out

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        layers = self.layers(trainer)
        rank = int(state.get("rank", self.max_rank))
        adapters = [truncate(A, B, rank) for A, B in self.unpack(layers, params, self.max_rank)]
        if "keep" not in state:
            return self.merge(layers, trainer.initial, adapters)
        keep, d_head = state["keep"], trainer.model.d_head
        adapters = self.expand_adapters(layers, self.slice_adapters(layers, adapters, keep, d_head), keep, d_head)
        flat = self.merge(layers, trainer.initial, adapters)
        offsets = self._offsets(trainer)
        for i, block in enumerate(trainer.model.blocks):  # zero o's columns of pruned heads, fc2's of pruned channels
            heads = (keep[0][i][:, None] * d_head + torch.arange(d_head)).reshape(-1)
            for name, kept_cols, width in (("attn.o", heads, block.attn.o.in_features),
                                           ("ff.fc2", keep[1][i], block.ff.fc2.in_features)):
                W = flat[offsets[f"blocks.{i}.{name}.weight"]].view(-1, width)
                mask = torch.ones(width, dtype=torch.bool)
                mask[kept_cols] = False
                W[:, mask] = 0.0
        return flat

    def device_model(self, trainer, params: torch.Tensor, state: dict[str, Any]) -> TinyLM:
        """A client's own model as a physically pruned TinyLM: its kept base plus the server's adapters, merged."""
        flat = self.personal_params(trainer, params, ClientData(-1, torch.empty(0), torch.empty(0)), state, 0)
        model = to_model(trainer, flat)
        return restrict(model, state["ratio"], state["keep"]) if "keep" in state else model

    def device_report(self, sim, batch: torch.Tensor | None = None, repeats: int = 10) -> list[dict[str, Any]]:
        """Per client of ``sim`` (a Simulator run with this strategy): its compute tier, current arm (``ratio``,
        ``rank``; None before its first task), its pruned model's parameter count, the training memory of its arm
        (``memory_bytes``, as the memory mask used it; None before its first task),
        the measured inference latency of its pruned model (``latency_s``: median seconds of a forward pass on
        ``batch``, default 8 windows of zeros, over ``repeats`` timed passes; measured once per distinct
        architecture, since it depends only on the shapes) and the arms it was given, in order."""
        self.setup(sim.trainer)
        out, latency = [], {}
        for c in range(sim.n_clients):
            trainer = sim.models.trainer(c)
            state = sim.client_states.get(c, {})
            model = self.device_model(trainer, sim.params, state)
            x = torch.zeros(8, model.context, dtype=torch.long) if batch is None else batch
            shape = json.dumps(model.sizes())
            if shape not in latency:
                latency[shape] = inference_latency(model, x, repeats=repeats)
            arm = (float(state["ratio"]), int(state["rank"])) if "ratio" in state else None
            memory = float(self.arm_memory()[self.arms.index(arm)]) if arm in self.arms else None
            out.append({"client": c, "tier": sim.profiles[c].tier, "ratio": state.get("ratio"),
                        "rank": state.get("rank"), "params": param_count(model), "memory_bytes": memory,
                        "latency_s": latency[shape], "arms": list(state.get("arms", []))})
        return out

    def summary(self, server) -> dict[str, Any]:
        """``choices``: per client id, the history of its bandit (one dict per arrival or cancellation: ``version``
        the task started from, arrival time ``t``, ``ratio``, ``rank``, validation-loss ``gain``, ``seconds`` and
        ``reward``); ``devices``: per client id, :meth:`device_report` of the final models (without ``arms``,
        which ``choices`` holds). ``server`` is the simulator at the end of the run."""
        devices = [{k: v for k, v in d.items() if k not in ("arms", "client")} for d in self.device_report(server)]
        return {"choices": [list(self.history.get(c, [])) for c in range(server.n_clients)], "devices": devices}
