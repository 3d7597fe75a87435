"""Save a complete checkpoint at step 1, then die (SIGKILL) in the middle of saving step 2:
after DCP wrote the tensor files and its .metadata, before aitrain's COMPLETE marker."""

import os
import signal
import sys

import torch
import torch.distributed.checkpoint as dcp

from aitrain.strategies import checkpoint as ckpt

root = sys.argv[1]
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
opt.step()
ckpt.save(root, 1, model, opt)

real_save = dcp.save


def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


dcp.save = save_then_die
ckpt.save(root, 2, model, opt)
print("unreachable")
