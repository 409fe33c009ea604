"""Analyses of REPA Sec. 3.2: hidden states on noised inputs, linear probes, CKNNA/CKA/mutual-kNN, tables and plots."""

from repa.analysis.hooks import collect_hidden_states, hidden_states
from repa.analysis.probe import ProbeResult, linear_probe, probe_layers, split_indices
from repa.analysis.report import heatmap, table_grid, write_csv, write_json
from repa.analysis.similarity import (
    alignment,
    alignment_table,
    cka,
    cknna,
    hsic_biased,
    hsic_unbiased,
    mutual_knn,
    prepare_features,
)

__all__ = [
    "ProbeResult",
    "alignment",
    "alignment_table",
    "cka",
    "cknna",
    "collect_hidden_states",
    "heatmap",
    "hidden_states",
    "hsic_biased",
    "hsic_unbiased",
    "linear_probe",
    "mutual_knn",
    "prepare_features",
    "probe_layers",
    "split_indices",
    "table_grid",
    "write_csv",
    "write_json",
]
