"""The memory fit check: will a model fit before we try to load it?"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from edgellm.runtime.source import ModelRecord

MB = 1024 * 1024


def estimate_bytes(record: ModelRecord, n_ctx: int, n_parallel: int) -> int:
    """Weights + KV cache (f16 K and V for every slot's context) + compute buffers."""
    kv = 2 * 2 * record.n_layer * n_ctx * n_parallel * record.n_head_kv * record.head_dim
    compute = 48 * MB + 4 * record.n_vocab * n_parallel + 4 * record.n_embd * 512 * 4
    return record.size + kv + compute


@dataclass
class Headroom:
    available: int  # bytes we may still use for models
    reason: str  # which limit binds: "system memory" or "memory budget"


def headroom(
    reserve_mb: int, budget_mb: int, used_by_models: int, governor_available_mb: float | None = None
) -> Headroom:
    system = psutil.virtual_memory().available - reserve_mb * MB
    if governor_available_mb is not None:
        seen = int(governor_available_mb * MB) - reserve_mb * MB
        if seen < system:
            system = seen
            reason = f"memory the governor reads as available less a {reserve_mb} MB reserve"
            if not budget_mb or budget_mb * MB - used_by_models >= system:
                return Headroom(system, reason)
    if budget_mb:
        budget = budget_mb * MB - used_by_models
        if budget < system:
            return Headroom(budget, f"memory budget of {budget_mb} MB")
    return Headroom(system, f"available system memory less a {reserve_mb} MB reserve")


_process = psutil.Process()


def rss_bytes() -> int:
    """This process's resident memory now."""
    return int(_process.memory_info().rss)
