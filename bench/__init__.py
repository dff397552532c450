"""Benchmarks for atlasburn-proxy (see bench/README.md)."""
