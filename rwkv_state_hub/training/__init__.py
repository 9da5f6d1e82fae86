"""State tuning: learn the initial recurrent state of a frozen RWKV model.

    config.py         TrainConfig, every option's rules, the learning-rate schedule
    step.py           one optimisation step (trainer, dry run and benchmark share it) and the batch order
    loop.py           train() and train_state(): set-up, then the loop
    checkpointing.py  the run folder's checkpoint: save, resume, the "holds a run already" rule
    distributed.py    torchrun / DDP and the device
    tracking.py       report_to: trackio, wandb, tensorboard
    report.py         the dry run and the closing summary
"""

from .config import TrainConfig, lr_at
from .loop import TrainResult, train, train_state
from .report import dry_run, summary

__all__ = ["TrainConfig", "TrainResult", "dry_run", "lr_at", "summary", "train", "train_state"]
