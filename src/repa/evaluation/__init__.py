"""repa.evaluation."""
