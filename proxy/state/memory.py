"""In-process state: the default backend when no `--redis` is given."""

from __future__ import annotations

from proxy.clock import Clock, RealClock
from proxy.state.memory_limits import MemoryLimits
from proxy.state.memory_records import MemoryRecords


class MemoryState(MemoryLimits, MemoryRecords):
    """Implements `proxy.state.base.StateBackend` in process memory, bounded."""

    name = "memory"

    def __init__(self, clock: Clock | None = None, *, max_records: int = 100_000) -> None:
        self.clock: Clock = clock or RealClock()
        MemoryLimits.__init__(self)
        MemoryRecords.__init__(self, max_records=max_records)

    async def close(self) -> None:
        return None
