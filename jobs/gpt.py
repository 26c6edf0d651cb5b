"""A GPT-style transformer language model (`jobs.gpt:gpt`), its loss (`jobs.gpt:lm_loss`) and metric
(`jobs.gpt:bits_per_byte`), free of distributed code like every model here.

Laid out as torchtitan lays out its models, so that every parallelism applies to it unchanged:
- the repeated blocks live in an `nn.ModuleDict` keyed "0", "1", ... (`layers.3.attn.q.weight`): a pipeline
  stage deletes the blocks it does not own and the others keep their names, so a checkpoint written by any
  layout has the same keys as one written by a single process;
- `forward` skips whatever a stage has set to None (`tok_embeddings`, `pos_embeddings`, `norm`, `output`):
  the first stage maps tokens to hidden states, middle stages map hidden states to hidden states, the last
  one maps them to logits;
- `Block` is the unit FSDP shards one by one;
- queries, keys and values are three projections, not one fused one: tensor parallelism splits each by
  heads (`GPT.tensor_parallel_plan`), and a fused weight cut in equal pieces would not split by heads.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention` (a fused kernel where one
    exists: flash attention on GPUs, a blocked kernel on CPUs). Under tensor parallelism q, k and v hold
    this rank's heads only: the head count is read from their width, so one process and a rank of many
    run the same code."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.head_dim, self.dropout = dim // heads, dropout
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        width = q.shape[-1]  # dim, or dim / tensor_parallel on a rank holding a share of the heads
        q, k, v = (t.view(batch, steps, width // self.head_dim, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, steps, width))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Tokens (B, T) -> logits (B, T, vocab); on a pipeline stage, whichever part of that it holds."""

    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int, mlp_ratio: int,
                 dropout: float, tied_embeddings: bool) -> None:
        super().__init__()
        self.seq_len, self.heads = seq_len, heads
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(vocab, dim)
        self.pos_embeddings: Optional[nn.Embedding] = nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleDict({str(i): Block(dim, heads, mlp_ratio, dropout) for i in range(layers)})
        self.norm: Optional[nn.LayerNorm] = nn.LayerNorm(dim)
        self.output: Optional[nn.Linear] = nn.Linear(dim, vocab, bias=False)
        _init_weights(self, layers)
        if tied_embeddings:
            # One tensor under two names: both names stay in the state dict, so a checkpoint's keys do not
            # depend on the tying. A pipeline that puts the two on different stages cannot tie them (the
            # gradient would have to be summed across stages): build it with tied_embeddings=False.
            self.output.weight = self.tok_embeddings.weight

    def tensor_parallel_plan(self, ranks: int) -> dict[str, str]:
        """How `parallel.tensor_parallel` splits the model over `ranks` ranks (jobs.parallel.tensor applies
        it; a plan is only declared here): in every block q, k, v and the MLP's first layer column-wise, each
        rank computing heads / ranks heads and hidden / ranks hidden units, and the two output projections
        row-wise, their partial sums added across the ranks. Embeddings, norms and the output layer are
        replicated: the residual stream is whole on every rank between blocks."""
        if self.heads % ranks:
            raise ValueError(f"model.kwargs.heads={self.heads} is not divisible by parallel.tensor_parallel="
                             f"{ranks}: each rank computes a whole number of heads")
        return {"layers.*.attn.q": "colwise", "layers.*.attn.k": "colwise", "layers.*.attn.v": "colwise",
                "layers.*.attn.proj": "rowwise", "layers.*.mlp.fc": "colwise", "layers.*.mlp.proj": "rowwise"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:  # the first stage: x holds token ids
            if x.shape[1] > self.seq_len:
                raise ValueError(f"a sequence of {x.shape[1]} tokens is longer than the model's seq_len "
                                 f"{self.seq_len}")
            x = self.tok_embeddings(x)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(torch.arange(x.shape[1], device=x.device))
            x = self.drop(x)
        for block in self.layers.values():
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.output(x) if self.output is not None else x


def _init_weights(model: GPT, layers: int) -> None:
    """GPT-2's initialisation, drawn from the global RNG (the trainer seeds it before building, so every
    rank builds the same weights): N(0, 0.02) everywhere, the projections that add to the residual stream
    scaled by 1/sqrt(2 x layers) so its variance does not grow with depth."""
    residual_std = 0.02 / math.sqrt(2 * layers) if layers else 0.02
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith(("attn.proj", "mlp.proj")) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def gpt(vocab: int = 256, seq_len: int = 128, dim: int = 128, layers: int = 4, heads: int = 4, mlp_ratio: int = 4,
        dropout: float = 0.0, tied_embeddings: bool = True) -> nn.Module:
    """The recipe entry (`model.target: jobs.gpt:gpt`): a GPT of `layers` blocks of width `dim`."""
    for name, value in (("vocab", vocab), ("seq_len", seq_len), ("dim", dim), ("heads", heads),
                        ("mlp_ratio", mlp_ratio)):
        if value < 1:
            raise ValueError(f"model.kwargs.{name} must be at least 1, not {value}")
    if layers < 0:
        raise ValueError(f"model.kwargs.layers must be at least 0, not {layers}")
    if dim % heads:
        raise ValueError(f"model.kwargs.dim={dim} must be divisible by model.kwargs.heads={heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.kwargs.dropout must be in [0, 1), not {dropout}")
    return GPT(vocab, seq_len, dim, layers, heads, mlp_ratio, dropout, tied_embeddings)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats) of (B, T, V) logits against (B, T) targets, the mean over every token.
    Every sample has T tokens, so this is also the mean over samples that evaluation weights by B."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): the mean cross-entropy of its tokens in bits. With byte tokens that is bits per
    byte, the compression rate a code of this model would reach (8 for a uniform guess)."""
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    return per_token.mean(1) / math.log(2)
