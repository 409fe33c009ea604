"""repa.encoders."""
