"""The built-in token dataset, generated deterministically (nothing to download).

Tokens follow a fixed sparse Markov chain: each token has ``branching`` likely
successors with fixed probabilities, so a model can learn it and the loss falls
from ln(vocab) towards the chain's entropy (about ln(branching)).

Batches depend only on (seed, step), never on the world size: every strategy
sees the same global batch at the same step, and each data-parallel rank takes
its contiguous slice. That is what makes losses comparable across strategies.
"""

from __future__ import annotations

import math

import torch


class MarkovTokens:
    def __init__(self, vocab_size: int, seq_len: int, branching: int = 4, seed: int = 0) -> None:
        if branching < 1 or branching > vocab_size:
            raise ValueError(f"data.branching={branching} must be in [1, vocab_size={vocab_size}]")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        g = torch.Generator().manual_seed(10_007 * seed + 1)
        self.successors = torch.stack(
            [torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)]
        )
        weights = torch.tensor([2.0 ** -i for i in range(branching)])
        self.probs = weights / weights.sum()

    @property
    def entropy(self) -> float:
        """The loss floor: entropy of the next-token distribution (nats)."""
        return float(-(self.probs * self.probs.log()).sum())

    @property
    def initial_loss(self) -> float:
        return math.log(self.vocab_size)

    def global_batch(self, step: int, batch_size: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 tokens for this optimizer step."""
        g = torch.Generator().manual_seed(1_000_003 * self.seed + step)
        out = torch.empty(batch_size, self.seq_len + 1, dtype=torch.long)
        out[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=g)
        choice = torch.multinomial(self.probs, batch_size * self.seq_len, replacement=True, generator=g)
        choice = choice.view(batch_size, self.seq_len)
        for t in range(self.seq_len):
            out[:, t + 1] = self.successors[out[:, t], choice[:, t]]
        return out

    def local_batch(self, step: int, batch_size: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's slice: (inputs [b, T], targets [b, T])."""
        if batch_size % dp_size:
            raise ValueError(
                f"train.global_batch_size={batch_size} is not divisible by the "
                f"data-parallel size {dp_size}"
            )
        per = batch_size // dp_size
        tokens = self.global_batch(step, batch_size)[dp_rank * per : (dp_rank + 1) * per]
        return tokens[:, :-1], tokens[:, 1:]
