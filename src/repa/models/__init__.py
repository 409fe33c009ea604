"""repa.models."""
