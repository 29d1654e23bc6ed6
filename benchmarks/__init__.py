"""Benchmarks for agentcast. ``python -m benchmarks.inprocess`` measures the core hot path."""
