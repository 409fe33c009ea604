"""Fixtures shared by the test modules: a tiny Fashion-MNIST-format dataset, an isolated repa cache, and the tiny
deterministic encoder that stands in for the configured ones in training tests."""

from __future__ import annotations

import pytest

from tests.helpers.tiny import PatchEncoder, write_idx_dataset


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    """40 class-patterned 28x28 images in the IDX layout (one per module)."""
    return write_idx_dataset(tmp_path_factory.mktemp("fmnist"), num=40)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A per-test repa cache (targets, converted weights) and no fault hook left set by another test."""
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("REPA_FAULT_AFTER_FILE", raising=False)


@pytest.fixture
def test_encoder(monkeypatch):
    """Replace the configured encoders by a tiny deterministic one (the real ones are tested in test_encoders)."""
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
