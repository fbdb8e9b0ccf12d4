"""pFedPG: a server-side generator of client-specific prompts for a frozen (pretrained) backbone.

Yang, Wang and Wang, "Efficient Model Personalization in Federated Learning via Client-Specific Prompt
Generation" (ICCV 2023, arXiv:2308.15367).

From the paper: the backbone stays frozen; each client n trains only a prompt (and, for classification, a
head of its own that never leaves it). The server holds a prompt generator G: client-agnostic prompt bases
P_base (T tokens of width d), one learned descriptor d_n per client and an attention layer in which the
descriptor queries the bases::

    q = W_q d_n,   K = P_base W_k^T,   V = P_base W_v^T          (k = key width)
    a = softmax(K q / sqrt(k))                                  (one weight per base token)
    P_n = G(d_n) = P_base + 1 (W_o (a^T V) + b_o)^T             (the attended vector added to every token)

A round sends each selected client its prompt P_n; the client trains it on its data ("personalized prompt
adaptation") into P~_n and returns it; the server reads the change dP_n = P~_n - P_n as the direction its
output should move ("personalized prompt generation") and steps the generator's parameters phi (P_base,
W_q, W_k, W_v, W_o, b_o and the descriptors) along the vector-Jacobian product, as pFedHN (arXiv:2103.04628)
does for hypernetworks::

    phi <- phi - lr * sum_n p_n (dP_n/dphi)^T (P_n - P~_n)

i.e. a gradient step on sum_n p_n ||G(d_n) - P~_n||^2 / 2 at the current phi. Only prompts travel.

Our choices. The generator's step is one per round on the sample-weighted mean (p_n = n_n / sum n) of the
round's clients' directions, plain SGD of rate ``generator_lr`` (the paper's step is per client, with its own
optimiser; a round's mean keeps the shared parts' step the size of one client's whatever the round's size,
and the aggregation deterministic); each descriptor therefore moves by its client's weight times the rate.
Initialisation (hetfl's): P_base is the model's own prompt (a pretrained model's soft prompt as built),
W_q, W_k, W_v uniform in +-1/sqrt(d) (nn.Linear's default), W_o = 0 and b_o = 0, so that the first prompts
every client gets are the model's own (as LoRA's B = 0 starts from the base), and descriptors uniform in
[-1, 1], all from fixed generator seeds; the key width is ``key_dim`` (the paper: 512 for ViT-B). A client's
model at evaluation (``personal_params``) is the backbone with the prompt it trained last (P~_n, kept in its
state) and its own head: what it uses after its adaptation; a client that never trained uses P_base.
The descriptors live on the server (the strategy; one row per client), not in ``server.params`` (which holds
the shared generator: P_base and the attention weights), as in the paper.

The model must follow the *prompt protocol*: a parameter named ``prompt`` (``model.prompt_tokens`` on
``tinylm``: prefix embeddings prepended to the input, :mod:`hetfl.models.transformer`; a model of one's own:
any ``nn.Parameter`` named ``prompt`` of shape (T, d) or (d,)). With ``local_head`` and a model that has a
classifier head (the head protocol, :mod:`hetfl.models.zoo`), the head is trained too and kept by the client;
TinyLM's output projection is its tied token embedding, frozen with the rest.

Costs: a task moves T * d floats each way (``transfer_bytes``); a client trains T * d (+ head) numbers. A step
is timed as a full training step of the model (an upper bound: the backbone's weight gradients are not used).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hetfl.errors import ConfigError
from hetfl.strategies.base import ClientData, ClientResult, Server, Task, Update
from hetfl.strategies.rounds import RoundStrategy, sample_weights
from hetfl.strategies.selection import Selection

INIT_SEED = 0  # the generator seed of the attention weights; INIT_SEED + 1 seeds the descriptors
PROTOCOL = ("a parameter named `prompt` (tinylm: set model.prompt_tokens, e.g. 8; a model of one's own: an "
            "nn.Parameter named prompt)")


def prompt_slice(trainer) -> slice:
    """Where the model's ``prompt`` parameter lies in the flat vector (buffers first, then parameters in order)."""
    prompt = getattr(trainer.model, "prompt", None)
    offset = trainer.n_buffers
    for p in trainer.model.parameters():
        if p is prompt:
            return slice(offset, offset + p.numel())
        offset += p.numel()
    raise ConfigError(f"strategy.name: pfedpg trains a soft prompt; {trainer.label} needs {PROTOCOL}")


def prompt_shape(trainer) -> tuple[int, int]:
    """(T, d): the prompt's tokens and width; a 1-d prompt is one token."""
    shape = tuple(trainer.model.prompt.shape)
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


def layout(tokens: int, dim: int, key_dim: int) -> dict[str, tuple[slice, tuple[int, ...]]]:
    """The shared generator as one flat vector: name -> (slice, shape), in the order P_base, W_q, W_k, W_v, W_o, b_o."""
    shapes = {"base": (tokens, dim), "w_q": (key_dim, dim), "w_k": (key_dim, dim), "w_v": (key_dim, dim),
              "w_o": (dim, key_dim), "b_o": (dim,)}
    out, offset = {}, 0
    for name, shape in shapes.items():
        out[name] = (slice(offset, offset + math.prod(shape)), shape)
        offset += math.prod(shape)
    return out


def generate(shared: torch.Tensor, descriptor: torch.Tensor, tokens: int, dim: int, key_dim: int) -> torch.Tensor:
    """G(d_n): the (T, d) prompt the shared generator ``shared`` makes of one client's ``descriptor`` (module docstring)."""
    g = {name: shared[where].reshape(shape) for name, (where, shape) in layout(tokens, dim, key_dim).items()}
    q = g["w_q"] @ descriptor  # (k,)
    keys, values = g["base"] @ g["w_k"].T, g["base"] @ g["w_v"].T  # (T, k) each
    a = torch.softmax(keys @ q / math.sqrt(key_dim), dim=0)  # (T,)
    return g["base"] + (g["w_o"] @ (a @ values) + g["b_o"])  # broadcast over the T tokens


def generator_step(shared: torch.Tensor, descriptors: torch.Tensor, clients: list[int], sent: list[torch.Tensor],
                   trained: list[torch.Tensor], weights: torch.Tensor, lr: float, tokens: int, dim: int,
                   key_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One generator step: (shared, descriptors) - lr * sum_n p_n (dP_n/dphi)^T (sent_n - trained_n), with the
    Jacobians at the given (shared, descriptors); new tensors (the arguments are not changed)."""
    phi = shared.detach().clone().requires_grad_(True)
    desc = descriptors.detach().clone().requires_grad_(True)
    objective = torch.zeros(())
    for client, p_sent, p_trained, w in zip(clients, sent, trained, weights):
        prompt = generate(phi, desc[client], tokens, dim, key_dim)
        direction = p_sent.reshape(tokens, dim) - p_trained.reshape(tokens, dim)
        objective = objective + w * (prompt * direction).sum()
    g_phi, g_desc = torch.autograd.grad(objective, [phi, desc])
    return (phi - lr * g_phi).detach(), (desc - lr * g_desc).detach()


class PFedPG(RoundStrategy):
    """pFedPG: client-specific prompts from a server-side generator; a frozen backbone (arXiv:2308.15367).

    Parameters
    ----------
    key_dim : int, default 16
        Width of the generator's attention keys, queries and values (W_q, W_k, W_v: key_dim x d).
    generator_lr : float, default 0.1
        The server's SGD rate on the generator (module docstring). The step is stable below about 2 / (T + 1): b_o
        moves with the sum of the T tokens' directions.
    local_head : bool, default True
        Also train the model's classifier head (head protocol), kept by each client; a model without one (TinyLM)
        trains its prompt alone.
    clients_per_round, deadline_s, selection
        See :class:`~hetfl.strategies.rounds.RoundStrategy`.
    """

    name = "pfedpg"
    personalised = True
    global_model = False

    def __init__(
        self,
        *,
        key_dim: int = 16,
        generator_lr: float = 0.1,
        local_head: bool = True,
        clients_per_round: int = 10,
        deadline_s: float | None = None,
        selection: Selection | None = None,
    ) -> None:
        super().__init__(clients_per_round=clients_per_round, deadline_s=deadline_s, selection=selection)
        if key_dim < 1:
            raise ValueError(f"key_dim must be a positive integer (e.g. 16); got {key_dim}")
        if not generator_lr > 0:
            raise ValueError(f"generator_lr must be positive (e.g. 0.1); got {generator_lr}")
        self.key_dim, self.generator_lr, self.local_head = key_dim, generator_lr, local_head
        self._descriptors: torch.Tensor | None = None  # (n_clients, d), made at start

    # -- the model ------------------------------------------------------------------------------------
    def check_models(self, trainers) -> None:
        for trainer in trainers:
            prompt_slice(trainer)

    def head(self, trainer) -> slice | None:
        """The head's slice when the client trains one of its own, else None."""
        return trainer.head_slice if self.local_head and trainer.head_problem() is None else None

    def initial_params(self, trainer) -> torch.Tensor:
        tokens, dim = prompt_shape(trainer)
        parts = layout(tokens, dim, self.key_dim)
        shared = torch.zeros(sum(where.stop - where.start for where, _ in parts.values()))
        shared[parts["base"][0]] = trainer.initial[prompt_slice(trainer)]
        gen = torch.Generator().manual_seed(INIT_SEED)
        for name in ("w_q", "w_k", "w_v"):
            where, _ = parts[name]
            shared[where] = (torch.rand(where.stop - where.start, generator=gen) * 2 - 1) / math.sqrt(dim)
        return shared  # w_o and b_o stay 0: every client's first prompt is P_base

    # -- the server half -------------------------------------------------------------------------------
    def start(self, server: Server) -> None:
        if self._descriptors is None:
            dim = prompt_shape(server.trainer)[1]
            gen = torch.Generator().manual_seed(INIT_SEED + 1)
            self._descriptors = torch.rand(server.n_clients, dim, generator=gen) * 2 - 1
        super().start(server)

    def prompt_for(self, server: Server, client_id: int) -> torch.Tensor:
        tokens, dim = prompt_shape(server.trainer)
        assert self._descriptors is not None
        with torch.no_grad():
            return generate(server.params, self._descriptors[client_id], tokens, dim, self.key_dim)

    def configure(self, server: Server, client_id: int) -> dict[str, Any]:
        return {"payload": {"prompt": self.prompt_for(server, client_id)}}

    def aggregate(self, server: Server, updates: list[Update]) -> torch.Tensor:
        tokens, dim = prompt_shape(server.trainer)
        shared, self._descriptors = generator_step(
            server.params, self._descriptors, [u.client_id for u in updates], [u.task.payload["prompt"] for u in updates],
            [u.params for u in updates], sample_weights(updates), self.generator_lr, tokens, dim, self.key_dim)
        return shared

    def upload_reference(self, server: Server, task: Task) -> torch.Tensor:
        """The prompt the server generated for the client: the client sends back its trained prompt."""
        return task.payload["prompt"].reshape(-1)  # sent as (tokens, dim), returned flat

    def transfer_bytes(self, server: Server, task: Task) -> tuple[int, int]:
        size = 4 * task.payload["prompt"].numel()  # the prompt down, the trained prompt up (float32)
        return size, size

    def describe_transfer(self, trainer) -> str:
        tokens, dim = prompt_shape(trainer)
        return f"a {tokens}x{dim} prompt, {4 * tokens * dim / 1e3:.1f} kB a transfer"

    def summary(self, server: Server) -> dict[str, Any]:
        trainer = server.trainer
        head = self.head(trainer)
        trained = prompt_slice(trainer).stop - prompt_slice(trainer).start
        return {**super().summary(server), "client_trainable_params": trained + (0 if head is None else head.stop - head.start),
                "generator_params": server.params.numel() + (0 if self._descriptors is None else self._descriptors.numel())}

    # -- the client half -------------------------------------------------------------------------------
    def own_model(self, trainer, prompt: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The frozen backbone with ``prompt`` and the client's own head (if it trains one)."""
        params = trainer.initial.clone()
        params[prompt_slice(trainer)] = prompt.reshape(-1).to(params.device)
        head = self.head(trainer)
        if head is not None and "head" in state:
            params[head] = state["head"].to(params.device)
        return params

    def client_train(self, trainer, task: Task, data: ClientData, state: dict[str, Any], seed: int) -> ClientResult:
        where, head = prompt_slice(trainer), self.head(trainer)
        start = self.own_model(trainer, task.payload["prompt"], state)
        mask = torch.zeros_like(start)
        mask[where] = 1.0
        if head is not None:
            mask[head] = 1.0
        result = trainer.train(start, data.x, data.y, steps=task.steps, seed=seed, grad_mask=mask)
        prompt = result.params[where].clone()
        state["prompt"] = prompt
        if head is not None:
            state["head"] = result.params[head].clone()
        return ClientResult(prompt, result.steps, result.loss)

    def personal_params(self, trainer, params: torch.Tensor, data: ClientData, state: dict[str, Any], seed: int):
        if "prompt" in state:
            return self.own_model(trainer, state["prompt"], state)
        tokens, dim = prompt_shape(trainer)
        return self.own_model(trainer, params[layout(tokens, dim, self.key_dim)["base"][0]], state)
