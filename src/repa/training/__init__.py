"""repa.training: the Accelerate training loop, EMA, checkpoints."""

from repa.training.loop import train

__all__ = ["train"]
