"""repa.training."""
