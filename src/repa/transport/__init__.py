"""repa.transport."""
