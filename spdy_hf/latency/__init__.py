"""Latency profiling: what each unit costs at each level, on the target backend, in the user's regime."""

from .table import TABLE_VERSION, LatencyTable

__all__ = ["LatencyTable", "TABLE_VERSION", "measure_latency_table"]


def measure_latency_table(*args, **kwargs):
    """Measures a table on the configured backend (see `spdy_hf.latency.cpu.measure_latency_table`)."""
    from .cpu import measure_latency_table as _measure

    return _measure(*args, **kwargs)
