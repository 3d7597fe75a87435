"""A Lightning ``Trainer`` job as a user would write it, run by aitrain.

    aitrain launch nproc_per_node=2 -- tests/frameworks/scripts/lightning_train.py [--accelerator cpu|cuda]

Lightning finds aitrain's ranks the way it finds torchrun's (``TorchElasticEnvironment``:
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``), so
``devices`` is this node's rank count and ``num_nodes`` the node count, as under torchrun.
A small MLP learns a fixed linear map. Metrics go to the launch's own MLflow run:

    MLFlowLogger(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], run_id=os.environ["MLFLOW_RUN_ID"])

(without ``MLFLOW_TRACKING_URI``, e.g. under plain torchrun, a ``CSVLogger`` writes under ``./lightning_logs``).
Each rank writes ``rank<N>.json`` (what the Trainer saw) into ``--report-dir`` when given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

IN, OUT = 16, 4


class Regressor(LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, OUT))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


def dataset(n: int = 1024) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, OUT, generator=g) / IN**0.5
    return TensorDataset(x, x @ w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--report-dir", default=None, help="write rank<N>.json here")
    args = p.parse_args()

    # As under torchrun: this node's ranks are the devices, the nodes are WORLD_SIZE / that.
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_nodes = max(1, int(os.environ.get("WORLD_SIZE", "1")) // devices)
    logger: Logger
    if "MLFLOW_TRACKING_URI" in os.environ:
        # The launch's own run (MLFLOW_RUN_ID); without it, a new run in that store.
        logger = MLFlowLogger(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], run_id=os.environ.get("MLFLOW_RUN_ID"))
    else:
        logger = CSVLogger(args.report_dir or ".")
    # Keep the console to what matters: Lightning's banners, tips and hints off.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for noise in (".*does not have many workers.*", ".*`srun` command is available.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", noise)
    seed_everything(0, verbose=False)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        max_steps=args.steps,
        logger=logger,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=args.report_dir or ".",
    )
    model = Regressor()
    trainer.fit(model, DataLoader(dataset(), batch_size=args.batch_size, shuffle=True))

    final = float(trainer.callback_metrics["train_loss"])
    if args.report_dir:
        seen = {
            "rank": int(os.environ.get("RANK", "0")),
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "global_step": trainer.global_step,
            "train_loss": final,
            "device": str(model.device),
            "mlflow_run_id": getattr(logger, "run_id", None),
        }
        Path(args.report_dir, f"rank{seen['rank']}.json").write_text(json.dumps(seen))
    if trainer.is_global_zero:
        print(f"lightning_train: {trainer.global_step} steps, train_loss {final:.4f}, "
              f"world size {trainer.world_size}", flush=True)


if __name__ == "__main__":
    main()
