"""The single-process reference every strategy's losses are compared with.

Same seed, same model init, same global batch per step (``MarkovTokens.global_batch``),
AdamW with the job's learning-rate schedule and torch's own gradient clipping, fp32.
Independent of ``aitrain.strategies`` on purpose.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from aitrain.launcher.config import JobConfig, ModelConfig, TrainConfig
from aitrain.launcher.data import MarkovTokens
from aitrain.launcher.train import lr_at
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy

# The tiny job every correctness test runs (fast on 2 CPU cores).
TINY = dict(d_model=32, n_head=4, seq_len=16, vocab_size=256)
STEPS = 10
BATCH = 8


def tiny_overrides(n_layer: int = 2, steps: int = STEPS, batch: int = BATCH) -> list[str]:
    return [f"model.n_layer={n_layer}", f"model.d_model={TINY['d_model']}", f"model.n_head={TINY['n_head']}",
            f"model.seq_len={TINY['seq_len']}", f"train.global_batch_size={batch}", f"train.steps={steps}",
            "tracking=none", "fabric=off"]


@functools.cache
def reference_losses(n_layer: int = 2, steps: int = STEPS, batch: int = BATCH) -> tuple[float, ...]:
    cfg = JobConfig(model=ModelConfig(n_layer=n_layer, **TINY), train=TrainConfig(steps=steps, global_batch_size=batch))
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    model = GPT(GPTArgs(m.vocab_size, m.seq_len, m.n_layer, m.n_head, m.d_model, m.mlp_ratio, m.dropout))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    data = MarkovTokens(m.vocab_size, m.seq_len, cfg.data.branching, t.seed)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        tokens = data.global_batch(step, batch)
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return tuple(losses)


def run_losses(run_dir: Path) -> list[float]:
    """Rank 0's per-step losses from a run directory's metrics spool."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"])]
