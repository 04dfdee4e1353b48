"""Webhooks the fakes send, as the real providers do (opt-in; docs/fakes.md).

A provider that did something (Stripe confirmed a PaymentIntent, PayPal captured an order,
SendGrid delivered a mail, Mailgun delivered a message) tells the merchant by POSTing a
signed event to the endpoint the merchant configured. Each fake has a
:class:`WebhookSender` (``FakeServer.webhooks``, ``app[WEBHOOKS_KEY]``) that does that for
it: off until ``settings.url`` is set (``make_*_app(webhooks={"url": ...})``, or later
``fake.webhooks.settings.url = ...``), so tests that do not ask for webhooks see none.

Delivery, like the providers': asynchronous (after ``delay`` seconds, never inside the API
call that caused the event), at least once (every event is POSTed until the endpoint
answers 2xx, up to ``attempts`` tries with ``backoff`` doubling between them: bounded, as
a fake must be), each try signed afresh (fakes/signing.py: a new timestamp, transmission or
token), and with ``redeliver`` (0..1, the share of events, 1.0 = every one) a second,
independent delivery of the same event (same event id) after the first, spread evenly (0.25:
every fourth event): providers deliver at least once, and an endpoint must expect repeats.

The POSTs run on the fake's event loop, or, with ``sender.courier`` set to a running
:class:`fakes.courier.Courier`, in that child process: a provider's webhooks come from
other machines, and a simulation that runs fakes, client and proxy on one event loop
should not pay for them there.

``sender.events`` lists every event made (id, type, payload), ``sender.attempts`` every POST
try (status or error); ``delivered()`` counts the 2xx deliveries per event id, ``failed()``
lists the deliveries that gave up; ``await sender.drain(within)`` waits for every delivery
(retries and redeliveries included) to end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .signing import SignSpec, iso_now, sign

if TYPE_CHECKING:
    from .courier import Courier

__all__ = [
    "WEBHOOKS_KEY",
    "Poster",
    "WebhookAttempt",
    "WebhookEvent",
    "WebhookSender",
    "WebhookSettings",
    "deliver",
    "install_webhooks",
    "iso_now",
]


@dataclass
class WebhookSettings:
    """Where and how a fake sends its webhooks. ``url=None``: it sends none (the default)."""

    url: str | None = None
    attempts: int = 4  # POST tries per delivery, the first included (bounded: a fake gives up)
    backoff: float = 0.5  # seconds before the second try, doubling up to max_backoff
    max_backoff: float = 8.0
    timeout: float = 10.0  # per POST
    delay: float = 0.0  # seconds between the event and its first POST
    redeliver: float = 0.0  # share of events delivered a second time (0..1; 1.0: every event twice)
    redeliver_after: float = 0.0  # seconds after the first delivery ended
    concurrency: int = 32  # POSTs in flight at once

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("webhooks.attempts must be at least 1")
        if not 0.0 <= self.redeliver <= 1.0:
            raise ValueError("webhooks.redeliver must be within 0..1")
        if self.concurrency < 1:
            raise ValueError("webhooks.concurrency must be at least 1")
        for name in ("backoff", "max_backoff", "timeout", "delay", "redeliver_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"webhooks.{name} must not be negative")

    @classmethod
    def of(cls, value: WebhookSettings | Mapping[str, Any] | None) -> WebhookSettings:
        if value is None:
            return cls()
        if isinstance(value, WebhookSettings):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown webhooks settings: {', '.join(unknown)}")
        return cls(**dict(value))

    def update(self, values: Mapping[str, Any]) -> None:
        """Change some settings (checked as a whole; nothing changes on an error)."""
        merged = WebhookSettings.of({**asdict(self), **values})
        for f in fields(self):
            setattr(self, f.name, getattr(merged, f.name))


@dataclass(frozen=True)
class WebhookEvent:
    """An event the fake made and sent (or is sending)."""

    id: str
    type: str
    payload: bytes  # the event as the provider serialised it (Mailgun: its `event-data`)
    t: float
    ref: str | None = None  # the object it is about (PaymentIntent, capture, message id)


@dataclass(frozen=True)
class WebhookAttempt:
    """One POST try."""

    event_id: str
    type: str
    delivery: int  # 1: the first delivery; 2: the redelivery
    attempt: int  # 1, 2, ... within that delivery
    status: int | None  # the endpoint's answer; None: no answer (error, timeout)
    error: str | None
    t: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Poster:
    """An HTTP client for webhook POSTs: its own pool, at most ``concurrency`` in flight,
    never through a proxy from the environment (a provider posts straight to the endpoint)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._size = 0

    async def post(
        self, url: str, body: Callable[[], tuple[bytes, Mapping[str, str]]], per_post: float, concurrency: int
    ) -> tuple[int | None, str | None]:
        """POST what ``body()`` makes (signed when the slot is free); (status, error)."""
        if self._slots is None or self._size != concurrency:
            self._slots, self._size = asyncio.Semaphore(concurrency), concurrency
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        async with self._slots:
            data, headers = body()
            try:
                async with self._session.post(
                    url,
                    data=data,
                    headers=dict(headers),
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=per_post),
                ) as resp:
                    await resp.read()
                    return resp.status, None
            except (TimeoutError, aiohttp.ClientError) as exc:
                return None, type(exc).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def deliver(
    event_id: str,
    event_type: str,
    payload: bytes,
    url: str,
    deliveries: int,
    settings: WebhookSettings,
    spec: SignSpec,
    poster: Poster,
    record: Callable[[WebhookAttempt], None],
) -> None:
    """Every POST of one event: ``deliveries`` deliveries (2: redelivered), each tried until a
    2xx or ``settings.attempts`` tries, each try signed anew; ``record`` gets every try."""
    s = settings
    if s.delay > 0:
        await asyncio.sleep(s.delay)
    for delivery in range(1, deliveries + 1):
        if delivery > 1 and s.redeliver_after > 0:
            await asyncio.sleep(s.redeliver_after)
        wait = s.backoff
        for attempt in range(1, s.attempts + 1):
            status, error = await poster.post(url, lambda: sign(spec, payload), s.timeout, s.concurrency)
            record(WebhookAttempt(event_id, event_type, delivery, attempt, status, error, time.time()))
            if status is not None and 200 <= status < 300:
                break
            if attempt < s.attempts:
                await asyncio.sleep(wait)
                wait = min(wait * 2, s.max_backoff)


class WebhookSender:
    """Sends one fake's webhook events (see the module docstring). ``spec()`` gives the
    provider's signing spec (fakes/signing.py), asked for on the first event."""

    def __init__(self, name: str, spec: Callable[[], SignSpec], settings: WebhookSettings | None = None) -> None:
        self.name = name
        self.spec = spec
        self.settings = settings or WebhookSettings()
        self.courier: Courier | None = None  # set to send from a courier process
        self.events: list[WebhookEvent] = []
        self.attempts: list[WebhookAttempt] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._poster = Poster()
        self._spec: SignSpec | None = None
        self._count = 0  # events sent so far (which ones are redelivered)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.url)

    @property
    def pending(self) -> int:
        """Deliveries not ended yet (waiting, being tried, or waiting to be redelivered)."""
        return len(self._tasks)

    def send(self, event_id: str, event_type: str, payload: bytes, *, ref: str | None = None) -> bool:
        """Send an event (in the background); False, and nothing happens, when off."""
        url = self.settings.url
        if not url:
            return False
        self.events.append(WebhookEvent(event_id, event_type, payload, time.time(), ref))
        s = self.settings
        # Spread evenly and exactly: with redeliver 0.25, every fourth event goes twice.
        n, self._count = self._count, self._count + 1
        deliveries = 2 if math.floor((n + 1) * s.redeliver) > math.floor(n * s.redeliver) else 1
        if self._spec is None:
            self._spec = self.spec()
        event = (event_id, event_type, payload, url, deliveries, s, self._spec)
        if self.courier is not None:
            self._track(self.courier.submit(self.name, *event, self.record))
        else:
            self.spawn(deliver(*event, self._poster, self.record))
        return True

    def record(self, attempt: WebhookAttempt) -> None:
        self.attempts.append(attempt)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a provider's own background step (SendGrid's batching) as part of the
        deliveries: ``drain`` waits for it and ``close`` cancels it."""
        self._track(asyncio.get_running_loop().create_task(coro))

    def _track(self, future: asyncio.Future[None]) -> None:
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    async def drain(self, within: float = 30.0) -> bool:
        """Wait until every delivery ended (delivered, or given up); False after ``within`` seconds."""
        deadline = time.monotonic() + within
        while self._tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.wait(list(self._tasks), timeout=left)
        return True

    def delivered(self) -> Counter[str]:
        """2xx deliveries per event id (2 for a redelivered event that reached the endpoint twice)."""
        return Counter(a.event_id for a in self.attempts if a.ok)

    def failed(self) -> list[tuple[str, int]]:
        """(event id, delivery) of every delivery that used all its tries without a 2xx."""
        tries: dict[tuple[str, int], list[WebhookAttempt]] = {}
        for a in self.attempts:
            tries.setdefault((a.event_id, a.delivery), []).append(a)
        return [
            key for key, seen in tries.items() if not any(a.ok for a in seen) and len(seen) >= self.settings.attempts
        ]

    def reset(self) -> None:
        """Forget the events and tries (settings and deliveries under way are kept)."""
        self.events.clear()
        self.attempts.clear()

    async def close(self) -> None:
        """Cancel the deliveries under way and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._poster.close()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "settings": asdict(self.settings),
            "courier": self.courier is not None,
            "pending": self.pending,
            "events": [
                {"id": e.id, "type": e.type, "t": e.t, "ref": e.ref, "payload": e.payload.decode("utf-8", "replace")}
                for e in self.events
            ],
            "attempts": [asdict(a) for a in self.attempts],
            "delivered": dict(self.delivered()),
        }


WEBHOOKS_KEY = web.AppKey("fake_webhooks", WebhookSender)


async def _get_webhooks(request: web.Request) -> web.Response:
    return web.json_response(request.app[WEBHOOKS_KEY].to_json())


async def _post_webhooks(request: web.Request) -> web.Response:
    try:
        values = await request.json()
        if not isinstance(values, dict):
            raise ValueError("body must be a JSON object of settings")
        request.app[WEBHOOKS_KEY].settings.update(values)
    except (ValueError, TypeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"settings": asdict(request.app[WEBHOOKS_KEY].settings)})


def install_webhooks(
    app: web.Application,
    name: str,
    spec: Callable[[], SignSpec],
    settings: WebhookSettings | Mapping[str, Any] | None,
    reset_hooks: list[Callable[[], None]],
) -> WebhookSender:
    """Give a fake app its sender, the ``/__fake__/webhooks`` control routes (GET: events and
    tries; POST: change settings), and its cleanup (deliveries under way are cancelled)."""
    sender = WebhookSender(name, spec, WebhookSettings.of(settings))
    app[WEBHOOKS_KEY] = sender
    reset_hooks.append(sender.reset)

    async def _close(_: web.Application) -> None:
        await sender.close()

    app.on_cleanup.append(_close)
    app.router.add_get("/__fake__/webhooks", _get_webhooks)
    app.router.add_post("/__fake__/webhooks", _post_webhooks)
    return sender
