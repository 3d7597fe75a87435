"""A user's torchrun-compatible script that asks aitrain for the strategy it was launched with.

    aitrain launch +strategy=pp script=user_train.py
"""

import sys

import torch
import torch.distributed as dist

from aitrain import strategies
from aitrain.strategies.model import GPT, GPTArgs, cross_entropy

dist.init_process_group("gloo")
settings = strategies.launch_settings()
torch.manual_seed(0)
model = strategies.apply(GPT(GPTArgs(n_layer=2, n_head=4, d_model=32, seq_len=16)))  # what `launch` was asked for
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
dp_rank, dp_size = strategies.data_parallel_rank(model)
for step in range(3):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 256, (8, 17), generator=g)
    per = 8 // dp_size
    mine = tokens[dp_rank * per : (dp_rank + 1) * per]
    loss = strategies.forward_backward(model, mine[:, :-1], mine[:, 1:], cross_entropy)
    strategies.clip_grad_norm_(model, 1.0)
    opt.step()
    opt.zero_grad()
    value = strategies.mean_loss(model, loss)
    if dist.get_rank() == 0:
        print(f"strategy {settings.strategy} ({settings.plan.describe()}) step {step + 1} loss {value:.5f}", flush=True)
strategies.checkpoint.save(sys.argv[1], 3, model, opt, info={"strategy": settings.strategy})
dist.destroy_process_group()
