"""The multi-node program of PyTorch's DDP tutorial series, for CPU ranks.

Source: pytorch/examples, distributed/ddp-tutorial-series/multinode.py and its datautils.py
(BSD-3-Clause), as of commit 17f4f9a5d66c6da5b348d032cd6a6e2410760952. The tutorial runs it
as ``torchrun --nnodes=2 --nproc_per_node=G --rdzv_backend=c10d ... multinode.py 50 10``; here
aitrain starts it (``aitrain launch backend=slurm nnodes=2 -- multinode.py 2 1``).

Written again here, not copied, keeping the tutorial's behaviour: the same command line
(``total_epochs save_every [--batch_size 32]``), the same data (2048 random samples of 20
features and 1 target), model (``Linear(20, 1)``), optimizer (SGD, lr 1e-3), the
``DistributedSampler`` split, the same progress lines (``[GPU<rank>] Epoch e | Batchsize: b |
Steps: s``) and the snapshot that rank 0 saves every ``save_every`` epochs to ``snapshot.pt``
in the working directory and every rank resumes from when it is there. Changed for CPU ranks:

* gloo instead of the accelerator's backend when there is no accelerator; the model and the
  batches stay on the CPU and DDP gets no ``device_ids`` (the tutorial moves both to
  ``LOCAL_RANK``, i.e. to ``cuda:<local rank>``, even on its CPU path);
* ``pin_memory`` only with an accelerator;
* the loss is MSE: the tutorial's ``cross_entropy`` over a single output is constant (zero
  gradient), so nothing would train;
* the data set is seeded, so every rank holds the same samples and the sampler's split is
  a real partition of one data set;
* the last line (rank 0) gives the final loss averaged over the ranks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class MyTrainDataset(Dataset):
    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.rand(20, generator=g), torch.rand(1, generator=g)) for _ in range(size)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index]


def ddp_setup() -> torch.device:
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.accelerator.is_available():
        device = torch.device(torch.accelerator.current_accelerator().type, local_rank)  # type: ignore[union-attr]
        torch.accelerator.set_device_index(local_rank)
        dist.init_process_group(backend=dist.get_default_backend_for_device(device))
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    print(f"Running on rank {os.environ['RANK']} on device {device}", flush=True)
    return device


class Trainer:
    def __init__(self, model: torch.nn.Module, train_data: DataLoader, optimizer: torch.optim.Optimizer,
                 save_every: int, snapshot_path: str, device: torch.device) -> None:
        self.global_rank = int(os.environ["RANK"])
        self.device = device
        self.model = model.to(device)
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.epochs_run = 0
        self.last_loss = float("nan")
        if os.path.exists(snapshot_path):
            print("Loading snapshot", flush=True)
            snapshot = torch.load(snapshot_path, map_location=device)
            self.model.load_state_dict(snapshot["MODEL_STATE"])
            self.epochs_run = snapshot["EPOCHS_RUN"]
            print(f"Resuming training from snapshot at Epoch {self.epochs_run}", flush=True)
        self.model = DDP(self.model, device_ids=[device.index] if device.type != "cpu" else None)

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model(source), targets)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.item()

    def _run_epoch(self, epoch: int) -> None:
        b_sz = len(next(iter(self.train_data))[0])
        print(f"[GPU{self.global_rank}] Epoch {epoch} | Batchsize: {b_sz} | Steps: {len(self.train_data)}",
              flush=True)
        self.train_data.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for source, targets in self.train_data:
            self._run_batch(source.to(self.device), targets.to(self.device))

    def _save_snapshot(self, epoch: int) -> None:
        snapshot = {"MODEL_STATE": self.model.module.state_dict(), "EPOCHS_RUN": epoch}
        torch.save(snapshot, self.snapshot_path)
        print(f"Epoch {epoch} | Training snapshot saved at {self.snapshot_path}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(self.epochs_run, max_epochs):
            self._run_epoch(epoch)
            if self.global_rank == 0 and epoch % self.save_every == 0:
                self._save_snapshot(epoch)


def main(save_every: int, total_epochs: int, batch_size: int, snapshot_path: str = "snapshot.pt") -> None:
    device = ddp_setup()
    dataset = MyTrainDataset(2048)
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    train_data = DataLoader(dataset, batch_size=batch_size, pin_memory=device.type != "cpu", shuffle=False,
                            sampler=DistributedSampler(dataset))
    trainer = Trainer(model, train_data, optimizer, save_every, snapshot_path, device)
    trainer.train(total_epochs)
    loss = torch.tensor([trainer.last_loss], device=device)
    dist.all_reduce(loss)
    if trainer.global_rank == 0:
        print(f"Done | world size {dist.get_world_size()} | mean final loss {loss.item() / dist.get_world_size():.4f}",
              flush=True)
    # Under torch 2.13 on gloo, a rank that destroys the group straight after a collective now and
    # then aborts at exit ("terminate called without an active exception", under plain torchrun
    # too; 1 run in 5 here): every rank waits for the others first.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="simple distributed training job")
    parser.add_argument("total_epochs", type=int, help="Total epochs to train the model")
    parser.add_argument("save_every", type=int, help="How often to save a snapshot")
    parser.add_argument("--batch_size", default=32, type=int, help="Input batch size on each device (default: 32)")
    args = parser.parse_args()
    main(args.save_every, args.total_epochs, args.batch_size)
