"""The delivery worker: sends kept sends through their upstream's pipeline (contract 7.6).

One supervised task per process (started by the server after the policies load, stopped
within the drain). Every `tick` seconds, or at once when a send is kept, it takes due
entries of each upstream with an `outbox` block, at most `outbox.concurrency` in flight
per upstream, and delivers each through `Pipeline.below("outbox")`: cache, failover
and the attempt loop (rate limit, retries, circuit breaker). A burst is therefore paced
by the upstream's rate limit (the calls wait in its queue) instead of answered 429.

What an attempt's outcome does to the entry (proxy/outbox/store.py has the states):

* 2xx: `delivered` (`failed_over` when a fallback took it), the provider's id kept;
* not sent (the same test as the stage's `on_failure`: connect errors, 429 "not
  processed", rate limit, open circuit, draining): `queued` again after a backoff
  (`Retry-After` when given, else 1 s doubling to `MAX_BACKOFF`), counted `retried`;
  past `max_age` it is `dead`;
* a 4xx that is not 429 (the provider refused the send itself): `dead`, with the
  status and the start of the answer in `last_error`;
* anything that may have reached the provider without a clear answer (timeout, reset,
  5xx): never resent blindly. If only this upstream may have it and its plugin can ask
  (Mailgun events, SendGrid Email Activity), it is in `doubt` and probed after
  `probe_after`: `found` -> delivered, `absent` -> queued, `unknown` -> asked again
  later until `max_age` (then `ambiguous`). Otherwise it is `ambiguous` at once and
  left for the operator (`egressd outbox retry ID` sends it again on their word).

Every few seconds (`maintenance_every`) it also takes back entries held by processes
that died (`recover`: claimed -> queued, sending -> doubt), ends entries past
`max_age` (`expire`) and publishes each upstream's depth (`OutboxDepth`: metrics and
`/status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from plugins.base import WireAnswer, WireRequest
from proxy.errors import ProxyError
from proxy.events import EventBus, OutboxDelivery, OutboxDepth
from proxy.model import AMBIGUOUS_KINDS, Call, CallStory, RequestBody, Response
from proxy.outbox.stage import not_sent
from proxy.outbox.store import Entry, EntryNotHeld, OutboxStore, OutboxUnavailable, UpstreamStats

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.runtime import Runtime, UpstreamRuntime

log = logging.getLogger("egressd.outbox")

MAX_BACKOFF = 60.0
LOG_EVERY = 10.0
ANSWER_LIMIT = 64 * 1024  # bytes of a delivery's answer read (for the provider's id)
_DROP = frozenset({"content-length", "transfer-encoding", "host"})


def backoff(attempts: int) -> float:
    """1 s, 2 s, 4 s ... up to `MAX_BACKOFF`, with +-20 % jitter."""
    base = min(MAX_BACKOFF, 2.0 ** max(attempts - 1, 0))
    return base * random.uniform(0.8, 1.2)


class OutboxWorker:
    def __init__(
        self,
        runtime: Runtime,
        store: OutboxStore,
        clock: Clock,
        events: EventBus,
        *,
        tick: float = 0.5,
        maintenance_every: float = 2.0,
        coalesce: float = 0.01,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.clock = clock
        self.events = events
        self.tick = tick
        self.maintenance_every = maintenance_every
        self.coalesce = coalesce
        self.stats: dict[str, UpstreamStats] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.errors = 0
        self.started = False
        self._wake = asyncio.Event()
        self._inflight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_maintenance = -1e18
        self._last_log = -1e18
        self._unfinished: dict[str, Entry] = {}  # finishes the store did not take yet

    # -- lifecycle ---------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self.started = True
            self._task = asyncio.get_running_loop().create_task(self._run(), name="egressd-outbox")

    async def stop(self, wait: float = 0.0) -> None:
        """Stop taking entries; give deliveries in flight up to `wait` seconds, then cancel
        them (their entries stay held by this process: the next process's recovery puts
        one cut before sending back in the queue, and one cut while sending in doubt)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._tasks and wait > 0:
            await asyncio.wait(list(self._tasks), timeout=wait)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the worker never dies of one bad turn
                self.errors += 1
                self._log_error("outbox worker turn failed", error=f"{type(exc).__name__}: {exc}")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.tick)
            # Woken by a kept send or a finished delivery: gather the ones that follow
            # (a burst of accepted sends wakes it thousands of times a second).
            await asyncio.sleep(self.coalesce)

    def _outbox_upstreams(self) -> list[UpstreamRuntime]:
        return [rt for rt in self.runtime.upstreams.values() if rt.policy.outbox is not None]

    async def run_once(self) -> None:
        """One turn: maintenance when due, then take what is due for every upstream."""
        now = self.clock.wall()
        if self.clock.now() - self._last_maintenance >= self.maintenance_every:
            self._last_maintenance = self.clock.now()
            await self.maintain(now)
        for rt in self._outbox_upstreams():
            assert rt.policy.outbox is not None
            free = rt.policy.outbox.concurrency - self._inflight.get(rt.name, 0)
            if free <= 0:
                continue
            for entry in await self.store.due_probes(rt.name, now, free):
                self._spawn(rt.name, self._guarded(entry, self._probe(entry)))
                free -= 1
            if free <= 0:
                continue
            for entry in await self.store.claim(rt.name, now, free):
                self._spawn(rt.name, self._guarded(entry, self._deliver(entry)))

    async def maintain(self, now: float) -> None:
        for entry in list(self._unfinished.values()):
            await self._finish(entry)
        outboxes = {rt.name: rt.policy.outbox for rt in self._outbox_upstreams()}

        def probe_after(upstream: str) -> float:
            settings = outboxes.get(upstream)
            return settings.probe_after if settings is not None else 60.0

        requeued, doubted = await self.store.recover(now, probe_after)
        if requeued or doubted:
            log.warning(
                "outbox entries of a process that died were taken back",
                extra={"requeued": requeued, "in_doubt": doubted},
            )
        for entry in await self.store.expire(now):
            result = "dead" if entry.state == "dead" else "ambiguous"
            self._count(entry.upstream, result)
            log.warning(
                "outbox entry ended without delivery",
                extra={"outbox_id": entry.id, "upstream": entry.upstream, "state": entry.state},
            )
        self.stats = await self.store.stats(now)
        for name in set(outboxes) | set(self.stats):
            st = self.stats.get(name, UpstreamStats())
            oldest = max(0.0, now - st.oldest) if st.oldest is not None else 0.0
            self.events.emit(OutboxDepth(name, st.pending, oldest))

    def _spawn(self, upstream: str, coro: Awaitable[None]) -> None:
        self._inflight[upstream] = self._inflight.get(upstream, 0) + 1

        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.error("outbox delivery failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            finally:
                self._inflight[upstream] -= 1
                self._wake.set()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, upstream: str, result: str) -> None:
        self.counts[(upstream, result)] = self.counts.get((upstream, result), 0) + 1
        self.events.emit(OutboxDelivery(upstream, result))

    # -- one delivery ------------------------------------------------------------------------
    async def _guarded(self, entry: Entry, work: Awaitable[None]) -> None:
        """Run a delivery or a probe; a bug in it (an exception) never leaves the entry held
        by this live process forever: it goes back to the queue if nothing was written
        upstream, else in doubt."""
        try:
            await work
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self.errors += 1
            log.error(
                "outbox delivery failed inside egressd",
                extra={"outbox_id": entry.id, "error": f"{type(exc).__name__}: {exc}"},
            )
            rt = self.runtime.get(entry.upstream)
            probe_after = rt.policy.outbox.probe_after if rt is not None and rt.policy.outbox is not None else 60.0
            entry.state = "doubt" if entry.sent_to else "queued"
            entry.due = self.clock.wall() + (probe_after if entry.sent_to else backoff(entry.attempts))
            entry.last_error = f"internal error: {type(exc).__name__}"
            await self._finish(entry)

    def _call(self, rt: UpstreamRuntime, request: WireRequest, request_id: str, story: CallStory) -> Call:
        headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP)
        now = self.clock.now()
        return Call(
            method=request.method,
            upstream=rt.name,
            path=request.path,
            query=request.query,
            headers=CIMultiDictProxy(headers),
            body=RequestBody(data=request.body),
            deadline=now + rt.policy.timeouts.total,
            started=now,
            request_id=request_id,
            route=rt.name,
            story=story,
        )

    async def _deliver(self, entry: Entry) -> None:
        rt = self.runtime.get(entry.upstream)
        if rt is None or rt.policy.outbox is None:
            # Reloaded away: back in the queue, untouched, for a later policy set.
            entry.state, entry.due, entry.last_error = "queued", self.clock.wall() + 30.0, "no outbox policy loaded"
            await self._finish(entry)
            return
        plugin = rt.plugin
        original = WireRequest(entry.method, entry.path, entry.query, dict(entry.headers), entry.body)
        request = plugin.outbox_tag(original, entry.id)
        story = CallStory()

        async def before_send(upstream: str) -> None:
            if upstream not in entry.sent_to:
                entry.sent_to.append(upstream)
            await self.store.mark_sending(entry.id, upstream)

        story.before_send = before_send
        entry.attempts += 1
        call = self._call(rt, request, f"{entry.id}-{entry.attempts}", story)
        result: Response | ProxyError
        try:
            result = await rt.pipeline.below("outbox")(call)
        except ProxyError as exc:
            result = exc
        except EntryNotHeld:
            # Another process took it back (it judged this one dead: a stalled loop): it is
            # theirs now; this attempt wrote nothing, and this process leaves it alone.
            log.warning("outbox entry taken back by another process: not sent here", extra={"outbox_id": entry.id})
            return
        except OutboxUnavailable as exc:  # marking it "sending" failed: nothing was sent
            result = ProxyError("state_unavailable", str(exc))
        await self._settle(entry, rt, result, story, original)

    async def _settle(
        self,
        entry: Entry,
        rt: UpstreamRuntime,
        result: Response | ProxyError,
        story: CallStory,
        original: WireRequest,
    ) -> None:
        assert rt.policy.outbox is not None
        now = self.clock.wall()
        answer: WireAnswer | None = None
        if isinstance(result, Response):
            try:
                data = await result.read(ANSWER_LIMIT)
            except ProxyError:
                data = b""
            finally:
                await result.close()
            answer = WireAnswer(result.status, {k: v for k, v in result.headers.items()}, data, result.error_code)
        if isinstance(result, Response) and 200 <= result.status < 300 and result.error_code is None:
            via = result.upstream or rt.name
            assert answer is not None
            # After a failover the answer is already translated into this upstream's shape
            # (the fallback's id in it: Mailgun's id as SendGrid's X-Message-Id).
            provider_id = rt.plugin.outbox_message_id(answer)
            entry.state, entry.provider_id, entry.delivered_via = "delivered", provider_id, via
            entry.last_error = ""
            await self._finish(entry)
            self._count(rt.name, "failed_over" if (result.failover or "").startswith("used") else "delivered")
            return
        if isinstance(result, ProxyError) and result.code == "state_unavailable" and not story.sending:
            entry.attempts -= 1  # it never left
            await self._requeue(entry, now, 1.0, "the store could not mark it sending")
            return
        if not_sent(result, story, rt.plugin):
            wait = _retry_after(result)
            await self._requeue(entry, now, wait if wait is not None else backoff(entry.attempts), _why(result))
            return
        if (
            answer is not None
            and answer.error is None
            and 400 <= answer.status < 500
            and answer.status != 429
            and not _ambiguous_story(story)
        ):
            entry.state = "dead"
            entry.last_error = f"{answer.status}: {answer.body[:200].decode('utf-8', 'replace')}"
            await self._finish(entry)
            self._count(rt.name, "dead")
            log.warning(
                "outbox send refused by the provider: dead",
                extra={"outbox_id": entry.id, "upstream": rt.name, "status": answer.status},
            )
            return
        # It may have reached the provider: ask, or leave it to the operator.
        entry.last_error = _why(result)
        if self._can_probe(entry, rt, original):
            entry.state, entry.due = "doubt", now + rt.policy.outbox.probe_after
            await self._finish(entry)
            return
        entry.state = "ambiguous"
        await self._finish(entry)
        self._count(rt.name, "ambiguous")
        log.warning(
            "outbox send may have reached the provider and cannot be checked: ambiguous, not resent",
            extra={"outbox_id": entry.id, "upstream": rt.name, "why": entry.last_error},
        )

    def _can_probe(self, entry: Entry, rt: UpstreamRuntime, original: WireRequest) -> bool:
        # Only where nothing but this upstream may have it (a failover's fallback would be
        # asked in its own shape, which egressd does not keep).
        if any(u != rt.name for u in entry.sent_to):
            return False
        return rt.plugin.outbox_probe(original, entry.id) is not None

    async def _requeue(self, entry: Entry, now: float, wait: float, why: str) -> None:
        entry.last_error = why
        if now + wait >= entry.expires:
            entry.state = "dead"
            entry.last_error = f"max_age passed; last: {why}"
            await self._finish(entry)
            self._count(entry.upstream, "dead")
            return
        entry.state, entry.due = "queued", now + wait
        await self._finish(entry)
        self._count(entry.upstream, "retried")

    async def _finish(self, entry: Entry) -> None:
        try:
            await self.store.finish(entry)
            self._unfinished.pop(entry.id, None)
        except OutboxUnavailable as exc:
            # The row stays held by this instance: the maintenance turn writes it again
            # (`_unfinished`) until the store takes it; a process that exits first leaves it
            # to the next one's recovery. Never a crash of the worker.
            self.errors += 1
            self._unfinished[entry.id] = entry
            self._log_error("outbox entry could not be written", outbox_id=entry.id, error=str(exc))

    def _log_error(self, message: str, **extra: Any) -> None:
        """At most one line per `LOG_EVERY` seconds (a store away fails every turn)."""
        now = self.clock.now()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.error(message, extra={**extra, "errors": self.errors})

    # -- asking the provider -----------------------------------------------------------------
    async def _probe(self, entry: Entry) -> None:
        rt = self.runtime.get(entry.upstream)
        now = self.clock.wall()
        if rt is None or rt.policy.outbox is None:
            entry.state, entry.due = "doubt", now + 30.0
            await self._finish(entry)
            return
        original = WireRequest(entry.method, entry.path, entry.query, dict(entry.headers), entry.body)
        probe = rt.plugin.outbox_probe(original, entry.id) if self._can_probe(entry, rt, original) else None
        if probe is None:
            entry.state = "ambiguous"
            await self._finish(entry)
            self._count(rt.name, "ambiguous")
            return
        call = self._call(rt, probe, f"{entry.id}-probe", CallStory())
        verdict, provider_id = "unknown", ""
        try:
            # The attempt loop only: a probe is never failed over nor cached.
            answer = await rt.pipeline.upstream(call)
            try:
                data = await answer.read(ANSWER_LIMIT)
            finally:
                await answer.close()
            verdict, provider_id = rt.plugin.outbox_probe_verdict(
                WireAnswer(answer.status, {k: v for k, v in answer.headers.items()}, data, answer.error_code)
            )
        except ProxyError as exc:
            entry.last_error = f"probe: {exc.code}"
        if verdict == "found":
            entry.state, entry.provider_id, entry.delivered_via = "delivered", provider_id, rt.name
            await self._finish(entry)
            self._count(rt.name, "delivered")
        elif verdict == "absent":
            # The provider does not have it: sending it again cannot duplicate it.
            entry.state, entry.due, entry.sent_to = "queued", now, []
            entry.last_error = "probe: the provider does not have it"
            await self._finish(entry)
            self._count(rt.name, "retried")
        else:
            assert rt.policy.outbox is not None
            entry.state, entry.due = "doubt", now + rt.policy.outbox.probe_after
            entry.last_error = entry.last_error or "probe: no clear answer"
            await self._finish(entry)

    # -- what /status and /outbox.json show ------------------------------------------------
    async def refresh(self) -> None:
        """Read the counts now (the maintenance turn reads them every few seconds)."""
        self.stats = await self.store.stats(self.clock.wall())

    def snapshot(self) -> dict[str, Any]:
        now = self.clock.wall()
        upstreams: dict[str, Any] = {}
        names = {rt.name for rt in self._outbox_upstreams()} | set(self.stats)
        for name in sorted(names):
            st = self.stats.get(name, UpstreamStats())
            upstreams[name] = {
                "pending": st.pending,
                "oldest_seconds": round(max(0.0, now - st.oldest), 3) if st.oldest is not None else 0.0,
                "in_doubt": st.doubt,
                "ambiguous": st.ambiguous,
                "dead": st.dead,
                "delivering": self._inflight.get(name, 0),
                "deliveries": {r: n for (u, r), n in sorted(self.counts.items()) if u == name},
            }
        return {"store": self.store.name, "running": self._task is not None, "upstreams": upstreams}


def _ambiguous_story(story: CallStory) -> bool:
    return any(a.kind in AMBIGUOUS_KINDS for a in story.attempts)


def _retry_after(result: Response | ProxyError) -> float | None:
    if isinstance(result, ProxyError):
        return result.retry_after
    value = result.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF)
    except ValueError:
        return None


def _why(result: Response | ProxyError) -> str:
    if isinstance(result, ProxyError):
        return f"{result.code}" + (f" ({result.detail})" if result.detail else "")
    if result.error_code:
        return f"{result.error_code}" + (f" ({result.detail})" if result.detail else "")
    return f"HTTP {result.status}"
