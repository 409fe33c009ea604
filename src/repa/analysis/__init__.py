"""repa.analysis."""
