"""A torchrun-compatible user script, launched with aitrain:

    aitrain launch script=examples/my_train.py script_args='[--epochs,1]' nproc_per_node=2

It gets the usual torch.distributed env (RANK, WORLD_SIZE, MASTER_ADDR, ...) and
the strategy the launcher was asked for through ``aitrain.strategies.apply``.
"""

import argparse

import torch
import torch.distributed as dist

from aitrain.strategies import apply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # y = 3x - 1 with noise; each rank sees its own slice of the data.
    x = torch.randn(512, 1)
    y = 3 * x - 1 + 0.01 * torch.randn(512, 1)
    x, y = x[rank::world], y[rank::world]

    # The strategy, degrees and options `aitrain launch` was asked for (+strategy=ddp, fsdp, ...).
    model = apply(torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(args.epochs):
        for _ in range(args.steps_per_epoch):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f}", flush=True)
    dist.barrier()  # gloo can abort if a peer destroys the group mid-collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
