"""A tiny GPT-2 trained by a Hugging Face ``Trainer`` with ``PruningCallback`` (run as a script).

``python tests/hf_worker.py OUTPUT_DIR RESULT_FILE [--kill-at N] [--resume CHECKPOINT]``:
trains 12 optimizer steps (2 batches of 2 accumulated per step, gradient clipping, AdamW,
a checkpoint every 4 steps), then writes the masks and weights to RESULT_FILE.
``--kill-at N`` SIGKILLs the process at the end of optimizer step N (after the checkpoint
of step N if N is a multiple of 4); ``--resume`` continues from a checkpoint folder.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from prunekit.integrations.transformers import PruningCallback
from prunekit.schedules import Polynomial

STEPS = 12
SCHEDULE = Polynomial(0.0, 0.8, begin=1, end=9, frequency=2)  # 0 at t=1, pruned at 3, 5, 7, 9


def model() -> torch.nn.Module:
    transformers.set_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (48, 12), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(output_dir: str, **overrides: Any) -> transformers.TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_grad_norm": 0.5,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "save_strategy": "steps",
        "save_steps": 4,
        "logging_steps": 100,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return transformers.TrainingArguments(**options)


class KillAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step + 1:  # the checkpoint of `step` is complete
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    output_dir, result = argv[0], argv[1]
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else None
    resume = argv[argv.index("--resume") + 1] if "--resume" in argv else None
    pruning = PruningCallback(SCHEDULE)
    callbacks: list[transformers.TrainerCallback] = [pruning]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = transformers.Trainer(
        model=model(), args=arguments(output_dir), train_dataset=dataset(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    assert pruning.pruner is not None
    torch.save(
        {
            "masks": dict(pruning.pruner.masks),
            "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "step": trainer.state.global_step,
        },
        result,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
