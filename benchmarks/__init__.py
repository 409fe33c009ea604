"""Speed and memory benchmarks of the REPA training step (`python -m benchmarks.step`, `repa bench step`)."""
