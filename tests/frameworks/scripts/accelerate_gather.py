"""A Hugging Face Accelerate program as a user would write it, run by aitrain.

    aitrain launch nproc_per_node=2 -- tests/frameworks/scripts/accelerate_gather.py --out result.json

``Accelerator()`` reads the rank environment the way it reads torchrun's. Each rank trains a
small linear model on its shard of the data (``accelerator.prepare``), then
``accelerator.gather`` collects one row per rank: its rank, the world size it saw, how many
samples it trained on, and a checksum of its final weights (equal on every rank when DDP kept
them in sync). The main process writes the gathered rows to ``--out`` as JSON.

With ``MLFLOW_TRACKING_URI`` set (aitrain sets it, with ``MLFLOW_RUN_ID``), ``log_with="mlflow"``:
Accelerate's MLflow tracker resumes the run ``MLFLOW_RUN_ID`` names, and each epoch's mean loss
(``train_loss``) lands in the launch's own run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings

import torch
from accelerate import Accelerator

logging.getLogger("accelerate").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", required=True, help="JSON file the main process writes the gathered rows to")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()

    tracking = "MLFLOW_TRACKING_URI" in os.environ
    accelerator = Accelerator(cpu=args.accelerator == "cpu", log_with="mlflow" if tracking else None)
    lr = 0.02
    if tracking:
        accelerator.init_trackers("accelerate_gather", config={"lr": lr, "epochs": args.epochs})
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.arange(1.0, 9.0)[:, None]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    seen = 0
    for epoch in range(args.epochs):
        total, batches = torch.zeros((), device=accelerator.device), 0
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            seen += len(xb)
            total += loss.detach()
            batches += 1
        mean = accelerator.reduce(total / batches, reduction="mean")  # over the ranks
        accelerator.log({"train_loss": float(mean)}, step=epoch)  # main process only, as Accelerate does

    weights = accelerator.unwrap_model(model).weight.detach()
    row = torch.tensor([[accelerator.process_index, accelerator.num_processes, seen,
                         float(weights.sum()), float(loss.detach())]], device=accelerator.device)
    rows = accelerator.gather(row).cpu().tolist()
    if accelerator.is_main_process:
        result = [{"rank": int(r[0]), "world_size": int(r[1]), "samples": int(r[2]), "weight_sum": r[3], "loss": r[4]}
                  for r in rows]
        with open(args.out, "w") as f:
            json.dump({"gathered": result, "env_rank": os.environ.get("RANK"),
                       "distributed_type": str(accelerator.distributed_type)}, f)
        print(f"accelerate_gather: gathered {len(rows)} rows, final loss {rows[0][4]:.4f}", flush=True)
    # Under torch 2.13 on gloo, a rank that destroys the group straight after the gather now and
    # then aborts ("terminate called without an active exception"; 2 runs in 6 under plain
    # torchrun): every rank waits for the others first.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
