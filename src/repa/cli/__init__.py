"""repa.cli."""
