"""The webhook delivery worker: stored events -> the app's `deliver_to` (contract 7.5, 7.8).

One supervised task per process, like the outbox worker (started by the server after the
policies load, stopped within the drain, its state on `/status`). Every `tick` seconds,
or at once when the listener stores something, it claims due entries of each upstream
with a `webhooks` block (at most `CONCURRENCY` in flight per upstream) and delivers each.

Delivering an entry means working out its parts, then POSTing each part not done yet:

* translation (after failover): for every primary P whose failover rules go to the
  entry's upstream U and whose `webhooks` block has a `deliver_to`, each event's
  `ledger_ids` are looked up in the routing ledger under P
  (`ledger_key(P, id)`, records whose `owner` is U); if U's plugin translates the event
  into P's shape (`translate_event`), that translated event is a part for P's
  `deliver_to`, signed with P's scheme and secret, with `X-Egressd-Translated-From: U`;
* the rest, the events with no translation, are one part for U's own `deliver_to`: the
  original body and headers (the body as received when nothing was taken out of it),
  re-signed with a fresh timestamp where U's plugin can (Stripe, Mailgun, SendGrid with
  a `signing_key`). Without a `deliver_to` they are dropped (counted, logged).

Every part carries `X-Egressd-Webhook-Id` (the entry's id) and `X-Egressd-Delivery-Attempt`.
A part answered 2xx is done and never sent again; the entry is delivered when all are.
Each 2xx is written to the store as soon as it is read, before the next part is sent (the
last part's with the entry's final state): the only repeat a kill -9 can cause is that of
the part whose 2xx the app had sent but egressd had not yet written (at least once;
docs/webhooks.md).
Otherwise it is queued again after a backoff (1 s doubling to `MAX_BACKOFF`, +-20 %)
until `max_age`, then dead (kept, counted, logged). The HTTP client is its own: its own
connection pool, no proxy from the environment, no redirects followed, nothing sent
anywhere but a `deliver_to` from the policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from plugins.base import ProviderPlugin
from plugins.webhooks import InboundEvent, WebhookSecrets
from proxy.events import EventBus, WebhookDepth, WebhookResult
from proxy.stages.failover import ledger_key
from proxy.webhooks.store import WebhookEntry, WebhookStats, WebhookStore, WebhooksUnavailable

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.runtime import Runtime, UpstreamRuntime

log = logging.getLogger("egressd.webhooks")

MAX_BACKOFF = 300.0
CONCURRENCY = 16  # deliveries in flight per upstream and process
TIMEOUT = 30.0  # one POST to the app
ANSWER_LIMIT = 4096  # bytes of the app's answer kept for last_error
TRANSLATED_FROM = "X-Egressd-Translated-From"
#: Headers of the stored POST not sent again as they were (aiohttp frames the body itself).
_DROP = frozenset({"content-length", "transfer-encoding", "host"})


def backoff(attempts: int) -> float:
    """1 s, 2 s, 4 s ... up to `MAX_BACKOFF`, with +-20 % jitter."""
    base = min(MAX_BACKOFF, 2.0 ** max(attempts - 1, 0))
    return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True, slots=True)
class Part:
    """One POST of an entry's delivery."""

    key: str  # "own", or "t:<translated event id>"
    url: str
    body: bytes
    headers: list[tuple[str, str]]
    plugin: ProviderPlugin  # whose scheme signs it
    secrets: WebhookSecrets
    events: int  # provider events it carries
    translated_from: str | None = None


@dataclass(slots=True)
class Plan:
    parts: list[Part] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # event ids with nowhere to go


def _set(headers: list[tuple[str, str]], values: Mapping[str, str]) -> list[tuple[str, str]]:
    """`headers` with each of `values` set (replacing any of the same name, any case)."""
    names = {k.lower() for k in values}
    return [(k, v) for k, v in headers if k.lower() not in names] + list(values.items())


class WebhookWorker:
    def __init__(
        self,
        runtime: Runtime,
        store: WebhookStore,
        clock: Clock,
        events: EventBus,
        *,
        tick: float = 0.5,
        maintenance_every: float = 2.0,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.clock = clock
        self.events = events
        self.tick = tick
        self.maintenance_every = maintenance_every
        self.stats: dict[str, WebhookStats] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.errors = 0
        self._wake = asyncio.Event()
        self._inflight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._last_maintenance = -1e18

    # -- lifecycle ---------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="egressd-webhooks")

    async def stop(self, wait: float = 0.0) -> None:
        """Stop taking entries; give deliveries in flight up to `wait` seconds, then cancel
        them (an entry cut mid-delivery is claimed: the next process's recovery, or the end
        of its lease, queues it again; at least once)."""
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
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the worker never dies of one bad turn
                self.errors += 1
                log.error("webhook worker turn failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.tick)

    def _upstreams(self) -> list[UpstreamRuntime]:
        return [rt for rt in self.runtime.upstreams.values() if rt.policy.webhooks is not None]

    async def run_once(self) -> None:
        now = self.clock.wall()
        if self.clock.now() - self._last_maintenance >= self.maintenance_every:
            self._last_maintenance = self.clock.now()
            await self.maintain(now)
        for rt in self._upstreams():
            free = CONCURRENCY - self._inflight.get(rt.name, 0)
            if free <= 0:
                continue
            for entry in await self.store.claim(rt.name, now, free):
                self._spawn(rt.name, self._deliver(entry))

    async def maintain(self, now: float) -> None:
        taken = await self.store.recover(now)
        if taken:
            log.warning("webhook deliveries of a process that died were taken back", extra={"requeued": taken})
        await self.store.purge(now)
        self.stats = await self.store.stats(now)
        for name in {rt.name for rt in self._upstreams()} | set(self.stats):
            st = self.stats.get(name, WebhookStats())
            oldest = max(0.0, now - st.oldest) if st.oldest is not None else 0.0
            self.events.emit(WebhookDepth(name, st.pending, oldest, st.dead))

    def _spawn(self, upstream: str, coro: Awaitable[None]) -> None:
        self._inflight[upstream] = self._inflight.get(upstream, 0) + 1

        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.error("webhook delivery failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            finally:
                self._inflight[upstream] -= 1
                self._wake.set()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, upstream: str, result: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[(upstream, result)] = self.counts.get((upstream, result), 0) + n
        self.events.emit(WebhookResult(upstream, result, n))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=64, limit_per_host=CONCURRENCY)
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # never through a proxy from the environment
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                auto_decompress=False,
            )
        return self._session

    # -- the parts of one delivery ---------------------------------------------------------
    async def plan(self, rt: UpstreamRuntime, entry: WebhookEntry) -> Plan:
        """Where this entry's events go now (see the module docstring)."""
        hooks = rt.policy.webhooks
        assert hooks is not None
        headers = {k: v for k, v in entry.headers}
        wanted = set(entry.event_ids)
        events = [e for e in rt.plugin.webhook_events(entry.body, headers) if e.id in wanted]
        primaries = [
            p
            for p in self.runtime.upstreams.values()
            if p.policy.webhooks is not None
            and p.policy.webhooks.deliver_to
            and p.name != rt.name
            and any(rule.to == rt.name for rule in p.policy.failover)
        ]
        plan = Plan()
        own: list[InboundEvent] = []
        for event in events:
            part = await self._translated(rt, event, primaries) if primaries else None
            if part is not None:
                plan.parts.append(part)
            else:
                own.append(event)
        if own and hooks.deliver_to:
            body = entry.body
            if len(own) < len(events) and entry.body.lstrip().startswith(b"["):
                body = b"[" + b",".join(e.body for e in own) + b"]"
            plan.parts.append(
                Part(
                    "own",
                    hooks.deliver_to,
                    body,
                    [(k, v) for k, v in entry.headers if k.lower() not in _DROP],
                    rt.plugin,
                    hooks.webhook_secrets(),
                    len(own),
                )
            )
        elif own:
            plan.dropped = [e.id for e in own]
        return plan

    async def _translated(
        self, rt: UpstreamRuntime, event: InboundEvent, primaries: list[UpstreamRuntime]
    ) -> Part | None:
        if not event.ledger_ids:
            return None
        for primary in primaries:
            prefetched: dict[str, Mapping[str, Any]] = {}
            for ledger_id in event.ledger_ids:
                raw = await self.runtime.state.ledger_get(ledger_key(primary.name, ledger_id))
                if raw is None:
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("owner") == rt.name:
                    prefetched[ledger_id] = record
            if not prefetched:
                continue
            translated = rt.plugin.translate_event(event, prefetched.get, target=primary.plugin.name)
            if translated is None:
                continue
            hooks = primary.policy.webhooks
            assert hooks is not None and hooks.deliver_to is not None
            headers = _set(list(translated.headers.items()), {"Content-Type": translated.content_type})
            return Part(
                "t:" + translated.event_id,
                hooks.deliver_to,
                translated.body,
                headers,
                primary.plugin,
                hooks.webhook_secrets(),
                1,
                translated_from=rt.name,
            )
        return None

    # -- one delivery --------------------------------------------------------------------------
    async def _deliver(self, entry: WebhookEntry) -> None:
        rt = self.runtime.get(entry.upstream)
        now = self.clock.wall()
        if rt is None or rt.policy.webhooks is None:
            # Reloaded away: back in the queue, untouched, for a later policy set.
            entry.state, entry.due, entry.last_error = "queued", now + 30.0, "no webhooks policy loaded"
            await self._finish(entry)
            return
        plan = await self.plan(rt, entry)
        if plan.dropped and entry.attempts == 0:
            self._count(rt.name, "dropped", len(plan.dropped))
            log.warning(
                "webhook events with no translation and no deliver_to of their own: dropped",
                extra={"webhook_id": entry.id, "upstream": rt.name, "events": plan.dropped[:20]},
            )
        entry.attempts += 1
        failures: list[str] = []
        todo = [part for part in plan.parts if part.key not in entry.done]
        for n, part in enumerate(todo, 1):
            why = await self._post(entry, part)
            if why is None:
                entry.done.append(part.key)
                self._count(rt.name, "translated" if part.translated_from else "delivered", part.events)
                if n < len(todo):
                    # Written now, still claimed: a process killed while a later part is in
                    # flight does not send this one again after the restart.
                    await self._finish(entry)
            else:
                failures.append(why)
        if not failures:
            entry.state, entry.last_error = ("delivered" if plan.parts else "dropped"), ""
            await self._finish(entry)
            return
        why = "; ".join(failures)[:500]
        now = self.clock.wall()
        wait = backoff(entry.attempts)
        if now + wait >= entry.expires:
            entry.state, entry.last_error = "dead", f"max_age passed; last: {why}"
            await self._finish(entry)
            self._count(rt.name, "dead", max(len(entry.event_ids), 1))
            log.error(
                "webhook delivery dead after max_age: kept for the operator",
                extra={"webhook_id": entry.id, "upstream": rt.name, "attempts": entry.attempts, "why": why},
            )
            return
        entry.state, entry.due, entry.last_error = "queued", now + wait, why
        await self._finish(entry)
        self._count(rt.name, "retried")

    async def _post(self, entry: WebhookEntry, part: Part) -> str | None:
        """POST one part; None on a 2xx, else why not (no secrets, no body)."""
        now = self.clock.wall()
        body = part.body
        headers = list(part.headers)
        signed = part.plugin.signed_delivery(body, part.secrets, now)
        if signed is not None:
            body = signed.body
            headers = _set(headers, signed.headers)
        extra = {"X-Egressd-Webhook-Id": entry.id, "X-Egressd-Delivery-Attempt": str(entry.attempts)}
        if part.translated_from is not None:
            extra[TRANSLATED_FROM] = part.translated_from
        headers = _set(headers, extra)
        try:
            async with self._client().post(part.url, data=body, headers=headers, allow_redirects=False) as answer:
                data = await answer.content.read(ANSWER_LIMIT)
                if 200 <= answer.status < 300:
                    return None
                text = data[:200].decode("utf-8", "replace")
                return f"{part.key}: HTTP {answer.status}" + (f": {text}" if text else "")
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return f"{part.key}: timeout"
        except aiohttp.ClientError as exc:
            return f"{part.key}: {type(exc).__name__}"

    async def _finish(self, entry: WebhookEntry) -> None:
        entry.updated = self.clock.wall()
        try:
            await self.store.finish(entry)
        except WebhooksUnavailable as exc:
            # Still claimed by this instance: its lease (or recovery) brings it back.
            self.errors += 1
            log.error("webhook entry could not be written", extra={"webhook_id": entry.id, "error": str(exc)})

    # -- what /status shows --------------------------------------------------------------------
    async def refresh(self) -> None:
        self.stats = await self.store.stats(self.clock.wall())

    def snapshot(self) -> dict[str, Any]:
        now = self.clock.wall()
        upstreams: dict[str, Any] = {}
        for name in sorted({rt.name for rt in self._upstreams()} | set(self.stats)):
            st = self.stats.get(name, WebhookStats())
            upstreams[name] = {
                "pending": st.pending,
                "oldest_seconds": round(max(0.0, now - st.oldest), 3) if st.oldest is not None else 0.0,
                "dead": st.dead,
                "delivering": self._inflight.get(name, 0),
            }
        return {"store": self.store.name, "running": self._task is not None, "upstreams": upstreams}
