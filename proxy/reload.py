"""Policy reloads: the directory watch, SIGHUP, and the validation-first swap.

The policy directory is polled every `watch_interval` seconds (mtime and size of each
`*.yaml`/`*.yml` and of every crosswalk file they name), and SIGHUP reloads at once. A
reload loads and validates the whole set off the event loop; only a valid set is built
into new pipelines and swapped in (`Runtime.swap`, one dict replaced); an invalid one is
reported (`ConfigReloaded("failure")`, the log, /status) and the previous set keeps
serving. docs/design.md, "Reloads", says why polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from proxy.config.loader import LoadResult, load_policy_dir
from proxy.events import ConfigReloaded, EventBus
from proxy.runtime import Runtime, UpstreamRuntime

log = logging.getLogger("egressd")

Built = dict[str, UpstreamRuntime]


class PolicyRejected(Exception):
    """The first policy set cannot be served; the message says why (one line per problem)."""


def warn_problems(result: LoadResult) -> None:
    for problem in result.problems:
        if problem.severity == "warning":
            log.warning(str(problem))


class Reloader:
    def __init__(
        self,
        *,
        policies: Path,
        interval: float,
        runtime: Runtime,
        events: EventBus,
        applied: Callable[[Built], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.policies = policies
        self.interval = interval
        self.runtime = runtime
        self.events = events
        self._applied = applied  # run after a reloaded set is swapped in (listeners, metrics)
        self._spawn = spawn
        # What /status shows as the last reload: result, version, reason or problems.
        self.last_reload: dict[str, Any] | None = None
        self._files_seen: dict[str, tuple[float, int]] = {}
        self._lock = asyncio.Lock()

    def load_initial(self) -> Built:
        """Load, validate and swap in the set egressd starts with; `PolicyRejected` if it cannot."""
        result = load_policy_dir(self.policies, secrets="strict")
        if not result.ok or result.policy_set is None:
            raise PolicyRejected("\n".join(str(p) for p in result.problems if p.severity == "error"))
        warn_problems(result)
        try:
            built = self.runtime.build(result.policy_set)
        except LookupError as exc:
            raise PolicyRejected(str(exc)) from exc
        self.runtime.swap(built, result.policy_set)
        self._files_seen = self.scan_files()
        self.last_reload = {"result": "initial", "version": result.policy_set.version}
        return built

    def scan_files(self) -> dict[str, tuple[float, int]]:
        """mtime and size of every policy file and of every crosswalk file they name."""
        seen: dict[str, tuple[float, int]] = {}
        try:
            entries = list(os.scandir(self.policies))
        except OSError:
            return seen
        paths = [entry.path for entry in entries if entry.name.endswith((".yaml", ".yml"))]
        if self.runtime.policy_set is not None:
            paths += self.runtime.policy_set.crosswalk_files
        for path in paths:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                seen[path] = (st.st_mtime, st.st_size)
        return seen

    async def watch(self) -> None:
        """Poll the policy directory; a change is picked up within `interval` (+ load time)."""
        while True:
            await asyncio.sleep(self.interval)
            current = self.scan_files()
            if current != self._files_seen:
                self._files_seen = current
                await self.reload(reason="files changed")

    def on_sighup(self) -> None:
        """The SIGHUP handler: reload now, in the background."""
        self._spawn(self.reload("SIGHUP"))

    async def reload(self, reason: str = "SIGHUP") -> bool:
        async with self._lock:
            result: LoadResult = await asyncio.get_running_loop().run_in_executor(
                None, lambda: load_policy_dir(self.policies, secrets="strict")
            )
            problems = tuple(str(p) for p in result.problems if p.severity == "error")
            if not result.ok or result.policy_set is None:
                return self._failed(reason, problems)
            try:
                built = self.runtime.build(result.policy_set)
            except LookupError as exc:
                return self._failed(reason, (str(exc),))
            self.runtime.swap(built, result.policy_set)
            await self._applied(built)
            self.last_reload = {"result": "success", "version": result.policy_set.version, "reason": reason}
            self.events.emit(ConfigReloaded("success", result.policy_set.version))
            warn_problems(result)
            log.info("policies reloaded", extra={"version": result.policy_set.version, "reason": reason})
            return True

    def _failed(self, reason: str, problems: tuple[str, ...]) -> bool:
        self.last_reload = {"result": "failure", "version": self.runtime.version, "problems": list(problems)}
        self.events.emit(ConfigReloaded("failure", None, problems))
        log.error(
            "policy reload rejected; the previous set keeps serving",
            extra={"reason": reason, "problems": list(problems), "version": self.runtime.version},
        )
        return False
