"""The resource governor: sensors (or a replayed trace) → policy → the runtime's limits."""
