"""Shared test helpers: a tiny Fashion-MNIST-format dataset and a tiny frozen encoder."""
