"""The built-in example model: a small GPT-style decoder.

Laid out the way the parallel strategies expect (torchtitan-style):
``tok_embeddings``, ``layers`` (a ModuleDict keyed "0".."n-1", so pipeline stages
can drop the layers they don't own), ``norm``, ``output``. Attention keeps q/k/v/o
as separate Linear layers and the MLP keeps w1/w2, so tensor parallelism can
shard them column-/row-wise. Any of the top-level parts may be ``None`` on a
pipeline stage that does not own it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTArgs:
    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )


class Attention(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.n_head = args.n_head
        self.head_dim = args.d_model // args.n_head
        self.wq = nn.Linear(args.d_model, args.d_model, bias=False)
        self.wk = nn.Linear(args.d_model, args.d_model, bias=False)
        self.wv = nn.Linear(args.d_model, args.d_model, bias=False)
        self.wo = nn.Linear(args.d_model, args.d_model, bias=False)
        self.dropout = args.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_head / tp of them.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        hidden = args.mlp_ratio * args.d_model
        self.w1 = nn.Linear(args.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.d_model)
        self.attention = Attention(args)
        self.ffn_norm = nn.LayerNorm(args.d_model)
        self.feed_forward = FeedForward(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Module | None = nn.Embedding(args.vocab_size, args.d_model)
        self.pos_embeddings: nn.Module | None = nn.Embedding(args.seq_len, args.d_model)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layer)})
        self.norm: nn.Module | None = nn.LayerNorm(args.d_model)
        self.output: nn.Module | None = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Deterministic init given the global torch seed (same on every rank)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = std / math.sqrt(2 * self.args.n_layer) if name.endswith(("wo.weight", "w2.weight")) else std
                nn.init.normal_(p, mean=0.0, std=scale)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (int) on the first stage, hidden [B, T, D] on later stages."""
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                pos = torch.arange(tokens.shape[1], device=tokens.device)
                h = h + self.pos_embeddings(pos)
        else:
            h = tokens
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
