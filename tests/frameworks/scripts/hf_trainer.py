"""A Hugging Face ``transformers.Trainer`` job as a user would write it, run by aitrain.

    aitrain launch nproc_per_node=2 -- tests/frameworks/scripts/hf_trainer.py [--accelerator cpu|cuda]

A tiny GPT-2 built from a config (no download) learns a fixed repeating token pattern.
``report_to=["mlflow"]``: with aitrain's ``MLFLOW_TRACKING_URI``/``MLFLOW_RUN_ID`` in the
environment the Trainer's ``loss``/``train_loss`` land in the launch's own MLflow run.
Each rank writes ``rank<N>.json`` (what the Trainer saw: world size, process index, final
loss) into ``--report-dir`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Quiet and offline before transformers is imported: no hub, no progress bars, no advice.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

VOCAB = 64
SEQ = 32


class PatternTokens(torch.utils.data.Dataset):
    """Sequences of a repeating pattern at random offsets: learnable in a few dozen steps."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randperm(VOCAB, generator=g)[:16]
        starts = torch.randint(0, 16, (n,), generator=g)
        idx = (starts[:, None] + torch.arange(SEQ)[None, :]) % 16
        self.ids = pattern[idx]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--output-dir", default="hf_trainer_out")
    p.add_argument("--report-dir", default=None, help="write rank<N>.json here")
    args = p.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3,
        warmup_steps=0,
        logging_steps=5,
        save_strategy="no",
        report_to=["mlflow"],
        disable_tqdm=True,
        log_level="error",
        log_level_replica="error",  # the replicas' default, "warning", would override TRANSFORMERS_VERBOSITY
        use_cpu=args.accelerator == "cpu",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=PatternTokens(512))
    result = trainer.train()

    if args.report_dir:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        seen = {
            "rank": int(os.environ.get("RANK", "0")),
            "world_size": targs.world_size,
            "process_index": targs.process_index,
            "device": str(targs.device),
            "global_step": result.global_step,
            "train_loss": result.training_loss,
            "losses": losses,
        }
        Path(args.report_dir, f"rank{seen['rank']}.json").write_text(json.dumps(seen))
    if targs.process_index == 0:
        print(f"hf_trainer: {result.global_step} steps, train_loss {result.training_loss:.3f}, "
              f"world size {targs.world_size}", flush=True)


if __name__ == "__main__":
    main()
