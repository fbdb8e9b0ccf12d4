"""TinyLM: a tiny decoder-only byte/character language model whose heads and FFN channels can be cut out.

The architecture is GPT-2's pre-LN decoder (Radford et al. 2019), at toy sizes for CPU federations::

    h_0 = E[x] + P[0..L-1]
    h   = h + Attn(LN_1(h))          for every block
    h   = h + FFN(LN_2(h))
    logits = LN_f(h) @ W_out^T       W_out = E when the head is tied

    Attn(u) = O( concat_j softmax(q_j k_j^T / sqrt(d_head) + causal mask) v_j ),  q_j, k_j, v_j = rows of Q u, K u, V u
    FFN(u)  = fc2( act(fc1(u)) )

Attention is written out with explicit ``q``, ``k``, ``v`` and ``o`` :class:`~torch.nn.Linear` layers
(head ``j`` owns rows ``j*d_head .. (j+1)*d_head - 1`` of q, k, v and the same columns of o), so
structured pruning (:mod:`hetfl.models.pruning`) removes a head or an FFN channel by slicing
weights, and LoRA (:mod:`hetfl.models.lora`) can target any of these layers by name. Every block
carries its own head count and FFN width, so a pruned model is again a ``TinyLM``.

The model has no buffers: the causal mask is built on the fly, so the whole state is the parameters,
like every model of the zoo.

With ``prompt_tokens`` > 0 the model also has a soft prompt (Lester et al., arXiv:2104.08691): ``prompt``, a
learned ``(prompt_tokens, d_model)`` parameter prepended to the embedded input (without positions: the
input keeps positions ``0..L-1``); every input token attends to it, and its own outputs are dropped, so the
logits stay ``(N, L, V)``. This is the *prompt protocol* prompt-tuning algorithms (pFedPG) train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v, o projections.

    Parameters
    ----------
    d_model : int
        Width of the residual stream.
    n_heads : int
        Number of heads (may be any number >= 1 after pruning).
    d_head : int
        Width of one head; q, k, v map ``d_model -> n_heads * d_head`` and o maps back.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        inner = n_heads * d_head
        self.q = nn.Linear(d_model, inner)
        self.k = nn.Linear(d_model, inner)
        self.v = nn.Linear(d_model, inner)
        self.o = nn.Linear(inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, H*dh) -> (N, H, L, dh)
            return t.view(n, L, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (N, H, L, L)
        future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, L, self.n_heads * self.d_head)
        return self.o(out)


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` with ``d_ff`` hidden channels."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, d_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


def _per_layer(value: int | Sequence[int], n_layers: int, name: str) -> list[int]:
    values = [value] * n_layers if isinstance(value, int) else list(value)
    if len(values) != n_layers or any(int(v) < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or one positive int per layer ({n_layers}); got {value}")
    return [int(v) for v in values]


class TinyLM(nn.Module):
    """Decoder-only language model over token ids ``(N, L) -> logits (N, L, vocab_size)``.

    Parameters
    ----------
    vocab_size : int, default 256
        Number of token ids (256 for bytes).
    d_model : int, default 32
        Width of embeddings and of the residual stream.
    n_heads : int or sequence of int, default 4
        Attention heads, the same in every layer or one count per layer (pruned models).
    d_ff : int or sequence of int, default 64
        FFN hidden channels, the same in every layer or one width per layer.
    n_layers : int, default 2
        Number of blocks.
    context : int, default 64
        Longest input; the learned positional embedding has this many rows.
    d_head : int, optional
        Width of one head; defaults to ``d_model // n_heads`` (then ``n_heads`` must divide ``d_model``).
    tie_weights : bool, default True
        Reuse the token embedding as the output head (no extra parameters); otherwise a bias-free
        ``nn.Linear(d_model, vocab_size)`` named ``head``.
    activation : {"gelu", "relu"}, default "gelu"
        FFN non-linearity.
    prompt_tokens : int, default 0
        Rows of the soft prompt ``prompt`` prepended to every input (module docstring); 0: none. Initialised by
        :meth:`reset_prompt`.

    Parameter count (tied head)::

        V*d + context*d + 2*d + sum_layers [ 4*d + 3*(d*H*dh + H*dh) + (H*dh*d + d) + (d*f + f) + (f*d + d) ]

    plus ``V*d`` for an untied head.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        d_model: int = 32,
        n_heads: int | Sequence[int] = 4,
        d_ff: int | Sequence[int] = 64,
        n_layers: int = 2,
        context: int = 64,
        d_head: int | None = None,
        tie_weights: bool = True,
        activation: str = "gelu",
        prompt_tokens: int = 0,
    ) -> None:
        super().__init__()
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be 0 or more; got {prompt_tokens}")
        if min(vocab_size, d_model, n_layers, context) < 1:
            raise ValueError("vocab_size, d_model, n_layers and context must be positive")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")
        heads = _per_layer(n_heads, n_layers, "n_heads")
        widths = _per_layer(d_ff, n_layers, "d_ff")
        if d_head is None:
            if not isinstance(n_heads, int) or d_model % n_heads:
                raise ValueError(
                    f"n_heads ({n_heads}) must divide d_model ({d_model}), or pass d_head explicitly"
                )
            d_head = d_model // n_heads
        self.vocab_size, self.d_model, self.context, self.d_head = vocab_size, d_model, context, d_head
        self.tie_weights, self.activation = tie_weights, activation
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, h, d_head, f, activation) for h, f in zip(heads, widths))
        self.ln_f = nn.LayerNorm(d_model)
        self.prompt = nn.Parameter(torch.empty(prompt_tokens, d_model)) if prompt_tokens else None
        self.head = None if tie_weights else nn.Linear(d_model, vocab_size, bias=False)
        self.reset_prompt()

    def reset_prompt(self) -> None:
        """Set the soft prompt to what the model reads as ``prompt_tokens`` blanks (byte 32, or the last token id of a
        smaller vocabulary) at positions 0, 1, ... (cycled past the context): a prompt in the model's own embedding
        space, as Lester et al. initialise from the vocabulary. Called at construction and after a pretrained base is
        loaded (:func:`hetfl.models.pretrain.load_base`); nothing is drawn, so the other weights do not change."""
        if self.prompt is None:
            return
        rows = torch.arange(self.prompt.shape[0]) % self.context
        with torch.no_grad():
            self.prompt.copy_(self.tok.weight[min(32, self.vocab_size - 1)] + self.pos.weight[rows])

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def sizes(self) -> dict:
        """Keyword arguments that rebuild this architecture (per-layer head counts and FFN widths); the soft prompt
        is not part of it (a pretrained base has none)."""
        return dict(
            vocab_size=self.vocab_size, d_model=self.d_model, context=self.context, d_head=self.d_head,
            n_heads=[b.attn.n_heads for b in self.blocks], d_ff=[b.ff.fc1.out_features for b in self.blocks],
            n_layers=self.n_layers, tie_weights=self.tie_weights, activation=self.activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        if L > self.context:
            raise ValueError(f"input length {L} exceeds the model's context ({self.context}); cut the sequence")
        h = self.tok(x) + self.pos(torch.arange(L, device=x.device))
        if self.prompt is not None:
            h = torch.cat([self.prompt.expand(x.shape[0], -1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if self.prompt is not None:
            h = h[:, self.prompt.shape[0] :]
        return h @ self.tok.weight.T if self.head is None else self.head(h)


def tinylm(
    *,
    input_shape: Sequence[int],
    vocab_size: int | None = None,
    d_model: int = 32,
    n_heads: int = 4,
    d_ff: int = 64,
    n_layers: int = 2,
    prompt_tokens: int = 0,
) -> TinyLM:
    """``model.name: tinylm``: a :class:`TinyLM` over the data's vocabulary whose context is the data's sequence
    length (``input_shape == (context,)``); token inputs only (``data.dataset: text``); ``model.prompt_tokens``
    rows of soft prompt."""
    from hetfl.errors import ConfigError

    if vocab_size is None or len(input_shape) != 1:
        raise ConfigError("model.name: tinylm reads token sequences; use data.dataset text")
    return TinyLM(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_layers=n_layers,
                  context=int(input_shape[0]), prompt_tokens=prompt_tokens)


def _rows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """(N, L) rows as given; a 1-D stream cut into rows of ``context + 1`` tokens (the short tail dropped)."""
    if tokens.dim() == 2:
        return tokens
    n = tokens.numel() // (context + 1)
    if n == 0:
        raise ValueError(f"need at least {context + 1} tokens to make one row; got {tokens.numel()}")
    return tokens[: n * (context + 1)].view(n, context + 1)


def lm_loss(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``rows`` (N, L): positions ``0..L-2`` predict ``1..L-1``."""
    rows = rows.long()
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: TinyLM, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token.

    ``tokens`` is either rows ``(N, L)`` with ``L <= context + 1`` or a 1-D stream, which is cut into
    non-overlapping rows of ``context + 1`` tokens (the incomplete tail is dropped).
    """
    rows = _rows(torch.as_tensor(tokens).long(), model.context)
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        chunk = rows[i : i + batch_size]
        k = chunk.shape[0] * (chunk.shape[1] - 1)
        total += lm_loss(model, chunk).item() * k
        count += k
    return math.exp(total / count)
