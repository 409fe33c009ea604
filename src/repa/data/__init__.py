"""repa.data."""
