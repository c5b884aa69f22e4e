"""Training: PEFT builders, length-grouped batching, answer-only loss, checkpoints, the loop."""

from tuneline.train.loop import (
    EarlyStoppingCheck,
    TrainOptions,
    TrainResult,
    encode_all,
    evaluate_loss,
    train,
)
from tuneline.train.peft_builders import build_peft_config, wrap_for_training

__all__ = [
    "EarlyStoppingCheck",
    "TrainOptions",
    "TrainResult",
    "build_peft_config",
    "encode_all",
    "evaluate_loss",
    "train",
    "wrap_for_training",
]
