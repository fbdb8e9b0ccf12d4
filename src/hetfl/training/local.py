"""Local training on one client: the whole training step fits on one screen.

The model's state is one flat float32 vector, ``trainer.flat``: its floating-point persistent buffers first
(BatchNorm's ``running_mean`` and ``running_var``, any float tensor a module registers as a buffer and
``state_dict`` saves), then its parameters in ``model.parameters()`` order, so the classifier head (the last
parameters) is the tail of the vector. Buffers and parameters are views into it, and the parameters'
gradients views into a second flat vector, ``trainer.grad`` (whose buffer entries stay zero). So loading a
global model is one copy (``flat.copy_(params)``), reading the result is one clone, the algorithm-specific
terms (FedProx's proximal pull, SCAFFOLD's control-variate correction) are one vector operation on the
gradient, and an algorithm that averages vectors (the FedAvg family) averages the buffers sample-weighted
with the parameters, and counts their bytes, without knowing they are there.

What is not federated: buffers that are not floating point (BatchNorm's ``num_batches_tracked``, integer
index tables) and non-persistent buffers stay as the model holds them, shared by every client this trainer
trains. BatchNorm reads ``num_batches_tracked`` only when built with ``momentum=None`` (a cumulative moving
average, factor ``1 / num_batches_tracked``): there the counter runs over all the tasks this process's trainer
trains, whichever client's, so the running statistics weigh each new batch less the longer the run; it is not
part of a checkpoint (a resumed run counts from 0 again) and each Ray worker counts its own, so such a model's
runs are not reproducible across resumes and backends. With the default ``momentum`` (0.1) the counter is never
read and none of this matters.

Modes: the model is in ``train()`` mode only while :meth:`LocalTrainer.train` (or a strategy's own loop inside
:meth:`LocalTrainer.training`) runs, and in ``eval()`` mode otherwise: prediction, evaluation, the
representation a strategy reads for prototypes, FLOP counting. A task seeds torch's global random stream from its
seed, forked as ``torch.random.fork_rng(devices=[])`` forks it, so dropout and other random layers give the same
result for the same task, and the caller's stream is left as it was. An exception a model raises while it trains
or is evaluated is a one-line :class:`~hetfl.errors.HetflError` naming the model and what failed (BatchNorm given a
batch of one sample, say); ``HETFL_DEBUG=1`` lets the exception itself through.

Device: the model, ``flat`` and ``grad`` live on ``trainer.device`` (``training.device``,
:mod:`hetfl.training.device`), and what :meth:`LocalTrainer.train` and :meth:`LocalTrainer.predict` return stays
there; ``trainer.initial`` is on the CPU, with the server's models. The batch order is drawn on the CPU whatever the
device, so the same seed gives the same batches everywhere.

Batched training (:mod:`hetfl.training.vectorized`) holds buffers constant; :meth:`LocalTrainer.batching_problem`
says, once per trainer, whether a model can be trained that way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hetfl.config import TrainingConfig
from hetfl.errors import ConfigError, DivergedError, HetflError
from hetfl.training.device import CPU, resolve_device

HEAD_PROTOCOL = (
    "give the model a `head` attribute: an nn.Linear classifier whose parameters are the last of "
    "model.parameters() and whose input is the representation"
)
"""What a model must have for the algorithms that split off its classifier head (:mod:`hetfl.models.zoo`)."""


@dataclass
class LocalResult:
    params: torch.Tensor  # the flat vector (buffers, then parameters) after local training
    steps: int
    loss: float  # mean training loss over the steps


def federated_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers the flat vector holds: every floating-point buffer ``state_dict`` saves (persistent), by name,
    in ``named_buffers`` order (a buffer registered under two names once)."""
    out = []
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if buffer.is_floating_point() and attr not in module._non_persistent_buffers_set:
            out.append((name, buffer))
    return out


class _BufferSlot:
    """One buffer's place in the flat vector (``offset``, ``view``) and every (module, attribute) that holds it."""

    def __init__(self, name: str, offset: int, view: torch.Tensor, owners: list[tuple[nn.Module, str]]) -> None:
        self.name, self.offset, self.view, self.owners = name, offset, view, owners

    def home(self, collect: bool) -> None:
        """Make every owner hold the view again; with ``collect``, first copy a tensor a module put in its place
        (a model that assigns a new buffer rather than updating it in place) into the flat vector."""
        for module, attr in self.owners:
            current = module._buffers.get(attr)
            if current is self.view:
                continue
            if collect and current is not None:
                self.view.copy_(current.detach().reshape(self.view.shape))
            module._buffers[attr] = self.view


def flatten_state(model: nn.Module, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int, list[_BufferSlot]]:
    """Re-home the federated buffers and every parameter (and its gradient) as views into two flat vectors, on
    ``device`` (default: the CPU; the model should be there already, ``model.to(device)``).

    Returns ``(flat, grad, n_buffers, slots)``: the buffers are ``flat[:n_buffers]`` (their gradient entries are
    zero), the parameters ``flat[n_buffers:]`` in ``model.parameters()`` order.
    """
    buffers = federated_buffers(model)
    params = list(model.parameters())
    n_buffers = sum(b.numel() for _, b in buffers)
    n = n_buffers + sum(p.numel() for p in params)
    flat = torch.empty(n, dtype=torch.float32, device=device)
    grad = torch.zeros(n, dtype=torch.float32, device=device)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, buffer in module._buffers.items():
            if buffer is not None:
                owners.setdefault(id(buffer), []).append((module, attr))
    slots, offset = [], 0
    for name, buffer in buffers:
        k = buffer.numel()
        view = flat[offset : offset + k].view(buffer.shape)
        view.copy_(buffer.detach())
        slot = _BufferSlot(name, offset, view, owners[id(buffer)])
        slot.home(collect=False)
        slots.append(slot)
        offset += k
    for p in params:
        k = p.numel()
        flat[offset : offset + k].copy_(p.data.reshape(-1))
        p.data = flat[offset : offset + k].view_as(p)
        p.grad = grad[offset : offset + k].view_as(p)
        offset += k
    return flat, grad, n_buffers, slots


def flatten_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-home buffers and parameters into two flat vectors (:func:`flatten_state`); return both vectors."""
    flat, grad, _, _ = flatten_state(model)
    return flat, grad


def classifier_head(model: nn.Module) -> nn.Linear | None:
    """The model's classifier head by the head protocol: its ``head`` attribute if that is an ``nn.Linear``."""
    head = getattr(model, "head", None)
    return head if isinstance(head, nn.Linear) else None


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``y``, over every prediction.

    Classification: logits ``(B, C)``, labels ``(B,)``. Language modelling: logits ``(B, L, V)``, next-token
    targets ``(B, L)``, every token one prediction (``mean``: the mean over all ``B * L`` tokens, which is
    :func:`hetfl.models.transformer.lm_loss`). The flattening is a no-op reshape for classification.
    """
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


def short_error(err: BaseException) -> str:
    """An exception in one line, with the innermost frame outside torch and hetfl (the user's file and line)."""
    from hetfl.registry import _short

    return _short(err)


Regularizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(features, logits, y) -> scalar`` added to a batch's cross-entropy (FedProto's prototype pull)."""

_UNPROBED = object()


def _stream_seed(seed: int) -> int:
    """The seed of torch's global random stream in a task of batch seed ``seed``: a different stream from the batch
    order's (one splitmix64 step, so dropout masks are not drawn from the numbers that ordered the batches)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class _Training:
    """:meth:`LocalTrainer.training`: a plain class rather than a generator, since it wraps every task (it saves and
    restores the CPU generator's state exactly as ``torch.random.fork_rng(devices=[])`` does, at a fraction of its
    cost per call)."""

    __slots__ = ("trainer", "seed", "what", "saved")

    def __init__(self, trainer: "LocalTrainer", seed: int | None, what: str | Callable[[], str]) -> None:
        self.trainer, self.seed, self.what = trainer, seed, what

    def __enter__(self) -> None:
        self.saved = torch.default_generator.get_state()
        if self.seed is not None:
            torch.default_generator.manual_seed(_stream_seed(self.seed))
        self.trainer.set_mode(True)

    def __exit__(self, kind, err, traceback) -> bool:
        trainer = self.trainer
        try:
            trainer.set_mode(False)
            trainer.collect()
        finally:
            torch.default_generator.set_state(self.saved)
        if err is None or isinstance(err, HetflError) or not isinstance(err, Exception) or os.environ.get("HETFL_DEBUG"):
            return False
        text = self.what() if callable(self.what) else self.what
        raise HetflError(f"model {trainer.label}: {text} failed: {short_error(err)}") from None


class LocalTrainer:
    """Trains one shared model instance for whichever client is active.

    Parameters
    ----------
    model : nn.Module
        The architecture, any ``torch.nn.Module``; its federated buffers and its parameters are re-homed into
        the flat vector (see the module docstring).
    cfg : TrainingConfig
        Optimiser, learning rate, batch size, local steps or epochs.
    label : str
        A short name of the architecture (``mlp[64]``, a model of one's own: its import path), for reports
        and messages.
    key : str
        The config key that named the architecture (``model.name``, ``model.zoo.<i>.name``), for messages.

    Attributes
    ----------
    device : torch.device
        Where the model computes (``cfg.device`` resolved, :func:`hetfl.training.device.resolve_device`): the model,
        :attr:`flat` and :attr:`grad` live there, and so do what :meth:`train` and :meth:`predict` return.
    flat, grad : torch.Tensor
        The model's state (buffers, then parameters) and the parameters' gradients, as flat vectors.
    n_buffers : int
        Entries of ``flat`` that are buffers (the first ones); :attr:`buffer_slice`.
    initial : torch.Tensor
        The state the model was built with: where a client of this architecture starts when
        it keeps a model of its own (model-heterogeneous FL). On the CPU, as the server's models are.
    head : nn.Linear or None
        The classifier head by the head protocol (``model.head``; :mod:`hetfl.models.zoo`); its input is the
        model's representation (:meth:`features`). None for a model without one.
    reference : LocalTrainer
        The federation's reference architecture (``model.name``), whose parameters a global-model
        strategy's ``server.params`` are; itself unless a zoo gives this client another one.
    input_shape, token_input : tuple of int or None, bool
        One sample's shape and whether it is token ids, as the federation built the trainer
        (``engine.run.build_trainer_for``); None when not known (a trainer built by hand). pFedGate prices
        its sparse model's layers with them.
    """

    input_shape: tuple[int, ...] | None = None
    token_input: bool = False

    def __init__(self, model: nn.Module, cfg: TrainingConfig, label: str = "", key: str = "model.name") -> None:
        self.model = model
        self.cfg = cfg
        self.label = label or type(model).__name__.lower()
        self.key = key
        self.device = resolve_device(getattr(cfg, "device", "cpu"))
        model.to(self.device)
        self.flat, self.grad, self.n_buffers, self._slots = flatten_state(model, self.device)
        self.initial = self.flat.to(CPU, copy=True)
        self.head = classifier_head(model)
        self._head_problem = self._find_head_problem()
        self.reference: LocalTrainer = self
        self._batching = _UNPROBED
        modules = list(model.modules())
        plain = all(type(m).train is nn.Module.train for m in modules)
        self._modules_list: list[nn.Module] | None = modules if plain else None
        model.eval()

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def buffer_slice(self) -> slice:
        """The federated buffers' entries of the flat vector: its first :attr:`n_buffers`."""
        return slice(0, self.n_buffers)

    @property
    def buffer_names(self) -> list[str]:
        """The federated buffers' names (``state_dict`` keys), in the flat vector's order."""
        return [slot.name for slot in self._slots]

    @property
    def buffer_shapes(self) -> list[torch.Size]:
        return [slot.view.shape for slot in self._slots]

    def entries(self, module: nn.Module) -> torch.Tensor:
        """The indices into the flat vector of ``module``'s own parameters and federated buffers (not its
        children's), ascending: e.g. a BatchNorm layer's running statistics, weight and bias."""
        own = {id(t) for t in module.parameters(recurse=False)}
        found = [torch.arange(slot.offset, slot.offset + slot.view.numel()) for slot in self._slots
                 if any(owner is module for owner, _ in slot.owners)]
        offset = self.n_buffers
        for p in self.model.parameters():
            if id(p) in own:
                found.append(torch.arange(offset, offset + p.numel()))
            offset += p.numel()
        return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)

    def head_problem(self) -> str | None:
        """Why the head protocol does not hold for this model (None: it holds)."""
        return self._head_problem

    def _find_head_problem(self) -> str | None:
        if self.head is None:
            return "has no classifier head (a `head` attribute that is an nn.Linear)"
        params = list(self.model.parameters())
        head = list(self.head.parameters())
        if [id(p) for p in params[len(params) - len(head):]] != [id(p) for p in head]:
            return "has a `head` whose parameters are not the last of model.parameters()"
        return None

    @property
    def head_slice(self) -> slice:
        """The classifier head's entries of the flat vector (weight, then bias): its tail. Everything between the
        buffers and it is the body (the representation). A ConfigError naming the model if the head protocol does
        not hold (:meth:`require_head`)."""
        problem = self.head_problem()
        if problem is not None:
            raise ConfigError(f"{self.key}: {self.label} {problem}; {HEAD_PROTOCOL}")
        total = self.flat.numel()
        return slice(total - sum(p.numel() for p in self.head.parameters()), total)  # type: ignore[union-attr]

    @property
    def body_slice(self) -> slice:
        """The parameters before the head (between the buffers and :attr:`head_slice`)."""
        return slice(self.n_buffers, self.head_slice.start)

    def require_head(self, strategy: str) -> nn.Linear:
        """The head, or a one-line ConfigError: ``strategy`` splits off the classifier head and this model has none."""
        problem = self.head_problem()
        if problem is not None:
            raise ConfigError(
                f"{self.key}: {strategy} splits the model into a representation and a classifier head, and "
                f"{self.label} {problem}; {HEAD_PROTOCOL}"
            )
        return self.head  # type: ignore[return-value]

    def twin(self) -> "LocalTrainer":
        """A second trainer of this architecture on its own deep copy of the model (made once, then cached),
        for algorithms that train two models of one architecture side by side (FML's private and shared
        models). Its parameters are whatever was last loaded into it; load before use."""
        import copy

        twin = self.__dict__.get("_twin")
        if twin is None:
            twin = LocalTrainer(copy.deepcopy(self.model), self.cfg, self.label, self.key)
            twin.initial = self.initial.clone()
            twin.reference = self.reference
            self._twin = twin
        return twin

    def steps_for(self, n_samples: int) -> int:
        """Local steps of a task on a client holding ``n_samples`` training samples."""
        if self.cfg.local_steps is not None:
            return self.cfg.local_steps
        return max(1, math.ceil(self.cfg.local_epochs * n_samples / self.cfg.batch_size))

    def optimizer(self, lr: float | None = None, params: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """A fresh local optimiser (``training.optimizer``) over ``params`` (default: the model's)."""
        lr = self.cfg.lr if lr is None else lr
        params = list(self.model.parameters()) if params is None else params
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.cfg.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------------ the state
    def load(self, state: torch.Tensor) -> None:
        """Set the model to the flat vector ``state`` (buffers, then parameters)."""
        for slot in self._slots:
            slot.home(collect=False)
        self.flat.copy_(state)

    def collect(self) -> None:
        """Bring into the flat vector a buffer the model replaced rather than updated in place."""
        for slot in self._slots:
            slot.home(collect=True)

    def training(self, seed: int | None = None, what: str | Callable[[], str] = "training") -> "_Training":
        """A context manager: while its block runs, the model in ``train()`` mode, torch's global random stream
        seeded from ``seed`` and forked as ``torch.random.fork_rng(devices=[])`` forks it (the caller's stream is
        restored after), and an exception from the model a one-line :class:`~hetfl.errors.HetflError` naming it and
        ``what`` failed (``HETFL_DEBUG=1``: the exception itself). For strategies whose client half has its own loop
        (FML, pFedGate); :meth:`train` uses it."""
        return _Training(self, seed, what)

    def set_mode(self, training: bool) -> None:
        """``model.train(training)``; when no module overrides ``train``, by setting each module's flag directly
        (the same result, without ``nn.Module.train``'s recursion: it is done twice a task)."""
        if self._modules_list is None:
            self.model.train(training)
            return
        for module in self._modules_list:
            module.__dict__["training"] = training

    def train(
        self,
        params: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        steps: int,
        seed: int,
        prox_mu: float = 0.0,
        correction: torch.Tensor | None = None,
        lr: float | None = None,
        grad_mask: torch.Tensor | None = None,
        regularizer: Regularizer | None = None,
    ) -> LocalResult:
        """Run ``steps`` optimiser steps from ``params`` on (x, y); mini-batches reshuffled every epoch.

        The loss is :func:`task_loss`: cross-entropy per sample, or per token for language modelling.
        ``prox_mu`` adds FedProx's gradient ``mu * (w - params)``; ``correction`` is added to every
        gradient (SCAFFOLD's ``c - c_i``); ``grad_mask`` then multiplies the flat gradient (0 freezes an
        entry: FedRep's head and body phases; ``weight_decay``, applied inside the optimiser, still
        decays frozen entries); ``regularizer(features, logits, y)`` is added to each batch's loss. The three
        vectors are as long as ``flat``; their buffer entries are not used (buffers move only as the model's
        training-mode forward moves them: BatchNorm's running statistics).
        Batches are drawn from a generator seeded by ``seed`` (:meth:`batches`), and so is torch's global random
        stream (dropout), so a task's result does not depend on what else ran before it. Training runs on
        :attr:`device` (tensors given elsewhere are moved there; the engine gives them there) and the result's
        parameters are there too.
        """
        device = self.device
        if device.type != "cpu":
            params, x, y = params.to(device), x.to(device), y.to(device)
            correction = None if correction is None else correction.to(device)
            grad_mask = None if grad_mask is None else grad_mask.to(device)
        self.load(params)
        nb = self.n_buffers
        grad, flat = self.grad[nb:], self.flat[nb:]
        anchor = params[nb:] if prox_mu else None
        opt = self.optimizer(lr)
        loss_sum = torch.zeros((), device=device)
        step = [0, 0]  # the step and its batch size, for a message

        def where() -> str:
            return f"training step {step[0] + 1} of {steps} (a batch of {step[1]} sample{'s' * (step[1] != 1)})"

        with self.training(seed, where):
            for step[0], batch in enumerate(self.batches(x.shape[0], steps, seed)):
                step[1] = len(batch)
                self.grad.zero_()
                if regularizer is None:
                    loss = task_loss(self.model(x[batch]), y[batch])
                else:
                    features, logits = self.features(x[batch])
                    loss = task_loss(logits, y[batch]) + regularizer(features, logits, y[batch])
                loss.backward()
                if anchor is not None:
                    grad.add_(flat - anchor, alpha=prox_mu)
                if correction is not None:
                    grad.add_(correction[nb:])
                if grad_mask is not None:
                    grad.mul_(grad_mask[nb:])
                opt.step()
                loss_sum += loss.detach()
        mean_loss = loss_sum.item() / max(steps, 1)
        if not math.isfinite(mean_loss) or not torch.isfinite(self.flat).all():
            raise DivergedError(
                f"training diverged (loss {mean_loss}); lower training.lr or check the data normalisation"
            )
        return LocalResult(self.flat.clone(), steps, mean_loss)

    def batches(self, n: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
        """Index batches of ``steps`` local steps over ``n`` samples: a seeded permutation, reshuffled every epoch."""
        gen = torch.Generator().manual_seed(seed)
        bs = min(self.cfg.batch_size, n)
        order, cursor = torch.randperm(n, generator=gen), 0
        for _ in range(steps):
            if cursor + bs > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            yield order[cursor : cursor + bs]
            cursor += bs

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(representation, logits) of the current parameters on ``x``: the head's input and output, in the model's
        current mode (``eval`` outside :meth:`training`)."""
        problem = self.head_problem()
        if problem is not None:
            raise ConfigError(f"{self.key}: reading the representation needs the classifier head, and {self.label} "
                              f"{problem}; {HEAD_PROTOCOL}")
        head = self.head
        captured: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return captured[0], logits

    @torch.no_grad()
    def predict(self, params: torch.Tensor, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Logits of the model with ``params`` on ``x`` (evaluated in large batches, in ``eval`` mode), on :attr:`device`
        (``x`` elsewhere is moved there a batch at a time)."""
        self.load(params)
        try:
            return torch.cat([self.model(x[i : i + batch_size].to(self.device)) for i in range(0, x.shape[0], batch_size)])
        except HetflError:
            raise
        except Exception as err:
            if os.environ.get("HETFL_DEBUG"):
                raise
            raise HetflError(f"model {self.label}: evaluation failed: {short_error(err)}") from None

    # ------------------------------------------------------------------ batched training
    def batching_problem(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """Why :func:`hetfl.training.vectorized.train_many` cannot train this model (None: it can), found once by
        a probe on two of the samples ``(x, y)`` and cached.

        The probe: a training-mode forward must leave the buffers as they are (``train_many`` holds them
        constant; BatchNorm's running statistics move), and ``torch.func``'s batched gradient of two rows must
        run (no in-place update of a captured tensor, no random layer under ``vmap``) and equal the sequential
        gradient of each row.
        """
        if self._batching is _UNPROBED:
            self._batching = self._probe(x, y)
        return self._batching  # type: ignore[return-value]

    def _probe(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        from hetfl.training.vectorized import batched_grad

        pick = torch.arange(2) % max(int(x.shape[0]), 1)
        xb, yb = x[pick].to(self.device), y[pick].to(self.device)
        saved = self.flat.clone()
        initial = self.initial.to(self.device)
        try:
            if self.n_buffers:
                self.load(initial)
                try:
                    with torch.no_grad(), self.training(0):
                        self.model(xb)
                except HetflError as err:
                    return f"its training-mode forward failed ({err})"
                moved = [slot.name for slot in self._slots
                         if not torch.equal(slot.view.reshape(-1), initial[slot.offset : slot.offset + slot.view.numel()])]
                if moved:
                    names = ", ".join(moved[:3]) + (", ..." if len(moved) > 3 else "")
                    return f"its training-mode forward changes its buffers ({names}), which batched training holds fixed"
            rows = torch.stack([initial, initial])
            rows[1, self.n_buffers:] += 1e-3 * torch.randn(self.numel - self.n_buffers,
                                                           generator=torch.Generator().manual_seed(0)).to(self.device)
            nb = self.n_buffers
            try:
                self.set_mode(True)
                grads, losses = batched_grad(self, masked=False)(rows[:, nb:], rows[:, :nb], xb[None].expand(2, *xb.shape),
                                                                 yb[None].expand(2, *yb.shape))
            except Exception as err:
                return f"torch.func cannot batch its gradient ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
            finally:
                self.set_mode(False)
            for k in range(2):
                self.load(rows[k])
                self.grad.zero_()
                try:
                    with self.training(0):
                        loss = task_loss(self.model(xb), yb)
                        loss.backward()
                except HetflError as err:
                    return f"its training-mode forward failed ({err})"
                if not (torch.allclose(grads[k], self.grad[nb:], atol=1e-5, rtol=1e-4)
                        and torch.allclose(losses[k], loss.detach(), atol=1e-5, rtol=1e-4)):
                    return "its batched gradient differs from the sequential one"
            return None
        finally:
            self.grad.zero_()
            self.load(saved)
