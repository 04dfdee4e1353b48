"""Runtime-configurable fault injection for the fake provider servers.

A :class:`Faults` object holds an ordered list of :class:`Fault` rules.  For every
request (except the ``/__fake__/`` control paths) the fake asks
:meth:`Faults.match` which rule, if any, applies; the first matching rule wins.
Every rule can be limited to a path prefix, a method, a number of requests
(``count``) and can let the first ``after`` matching requests through.

Kinds (``Fault.kind``):

``status``          answer ``status`` (optionally with ``body``/``headers``/``retry_after``/
                    ``should_retry``); the body defaults to the provider's own error shape.
``delay``           sleep ``seconds``; ``phase`` is ``before`` (before the handler runs),
                    ``during`` (inside the handler, while idempotency locks are held, right
                    before the side effect) or ``after`` (side effect done, answer late).
``drip``            send the real answer ``chunk_size`` bytes every ``interval`` seconds.
``hang``            never answer (until the server stops or ``seconds`` pass, then reset).
``reset``           close the connection with a TCP RST before any response byte.
``reset_mid_body``  send the headers and ``after_bytes`` of the body, then RST.
``truncate``        announce a Content-Length ``extra_bytes`` larger than the body, send the
                    body, then close the connection cleanly (FIN).
``garbage``         write ``data`` (not HTTP) to the socket and close it.
``rate_limit``      allow ``rate`` requests per second (burst ``burst``); others get 429 with
                    Retry-After in the provider's error shape.  Never processed.
``outage``          for ``seconds`` from when it is added every matching request fails with
                    ``status`` (``mode="status"``) or a reset (``mode="reset"``).
``random``          each matching request fails with probability ``ratio`` (seeded ``seed``)
                    with ``status`` (or a reset when ``mode="reset"``).

``processed`` (``status``, ``reset``, ``hang``, ``garbage``, ``random``, ``outage``): when true the
request's handler runs first, so its side effect is recorded (and, for Stripe and PayPal,
its idempotent result stored), and only then is the client given the failure: an
ambiguous failure.  When false (the default) the handler never runs.  ``drip``,
``reset_mid_body`` and ``truncate`` always run the handler (they mangle its answer).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, cast, get_args

FaultKind = Literal[
    "status",
    "delay",
    "drip",
    "hang",
    "reset",
    "reset_mid_body",
    "truncate",
    "garbage",
    "rate_limit",
    "outage",
    "random",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)  # one list: the Literal above
DelayPhase = Literal["before", "during", "after"]
FailMode = Literal["status", "reset"]

DEFAULT_GARBAGE = b"HTTP/1.1 ???? \x00\x01\x02 not-http\r\n\xff\xfe garbage \x00\r\n\r\n"

_ids = itertools.count(1)


class FaultError(ValueError):
    """An invalid fault specification."""


@dataclass
class Fault:
    """One fault-injection rule.  See the module docstring for the kinds."""

    kind: FaultKind
    # --- matching -----------------------------------------------------------------
    count: int | None = None  # fire on this many requests, then expire; None: no limit
    path: str | None = None  # path prefix, e.g. "/v1/refunds"
    method: str | None = None  # e.g. "POST"; None: any
    after: int = 0  # let this many matching requests through first
    # --- what to answer -----------------------------------------------------------
    status: int = 503
    body: str | None = None  # None: the provider's own error shape
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: float | str | None = None  # seconds, or an HTTP-date string
    should_retry: bool | None = None  # Stripe-Should-Retry
    processed: bool = False
    # --- timing -------------------------------------------------------------------
    seconds: float = 1.0  # delay / outage length / hang limit
    phase: DelayPhase = "before"  # delay only
    chunk_size: int = 1  # drip
    interval: float = 0.05  # drip
    after_bytes: int | None = None  # reset_mid_body: bytes of body sent; None: half
    extra_bytes: int = 100  # truncate: Content-Length minus bytes sent
    data: str | None = None  # garbage (latin-1); None: a default garbage blob
    # --- rate / outage / random ---------------------------------------------------
    rate: float = 10.0  # rate_limit: requests per second
    burst: int | None = None  # rate_limit: bucket size; None: max(1, rate)
    mode: FailMode = "status"  # outage / random
    ratio: float = 0.5  # random
    seed: int | None = 0  # random
    # --- bookkeeping ----------------------------------------------------------------
    id: int = field(default_factory=lambda: next(_ids))
    hits: int = 0  # requests this rule fired on
    seen: int = 0  # matching requests seen (fired or not)
    until: float | None = None  # outage: monotonic end (set when added)
    _tokens: float = field(default=0.0, repr=False)
    _stamp: float = field(default=0.0, repr=False)
    _rng: random.Random | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise FaultError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if self.method is not None:
            self.method = self.method.upper()
        if self.count is not None and self.count < 0:
            raise FaultError("count must be >= 0")
        if self.phase not in ("before", "during", "after"):
            raise FaultError("phase must be before, during or after")
        if self.mode not in ("status", "reset"):
            raise FaultError("mode must be status or reset")
        if self.kind == "rate_limit":
            if self.rate <= 0:
                raise FaultError("rate must be > 0")
            if self.burst is None:
                self.burst = max(1, int(self.rate))
            self._tokens = float(self.burst)
            self._stamp = time.monotonic()
            if self.status == 503 and "status" not in self._explicit:
                self.status = 429
        if self.kind == "random":
            if not 0.0 <= self.ratio <= 1.0:
                raise FaultError("ratio must be within 0..1")
            self._rng = random.Random(self.seed)
            if self.status == 503 and "status" not in self._explicit:
                self.status = 500
        if self.kind == "outage" and self.until is None:
            self.until = time.monotonic() + self.seconds
        if self.chunk_size < 1:
            raise FaultError("chunk_size must be >= 1")

    # ``status`` default differs per kind; remember whether it was given.
    _explicit: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Fault:
        """Build a fault from a JSON-like mapping (the HTTP control API uses this)."""
        allowed = {f.name for f in fields(cls) if not f.name.startswith("_")} - {
            "id",
            "hits",
            "seen",
            "until",
        }
        unknown = set(spec) - allowed
        if unknown:
            raise FaultError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "kind" not in spec:
            raise FaultError("fault needs a 'kind'")
        kw = dict(spec)
        if "headers" in kw:
            hdrs = kw["headers"]
            if not isinstance(hdrs, Mapping):
                raise FaultError("headers must be an object")
            kw["headers"] = {str(k): str(v) for k, v in hdrs.items()}
        try:
            return cls(**kw, _explicit=frozenset(spec))
        except TypeError as exc:
            raise FaultError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out.pop("_rng", None)
        if self.until is not None:
            out["remaining_seconds"] = max(0.0, self.until - time.monotonic())
        out.pop("until", None)
        return out

    # ---------------------------------------------------------------------------------
    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method.upper() != self.method:
            return False
        return self.path is None or path.startswith(self.path)

    @property
    def expired(self) -> bool:
        if self.count is not None and self.hits >= self.count:
            return True
        return self.kind == "outage" and self.until is not None and time.monotonic() >= self.until

    def retry_after_header(self) -> str | None:
        if self.retry_after is None:
            return None
        if isinstance(self.retry_after, str):
            return self.retry_after
        return str(max(0, math.ceil(self.retry_after)))


@dataclass(frozen=True)
class FaultHit:
    """What :meth:`Faults.match` decided for one request."""

    fault: Fault
    kind: FaultKind
    retry_after: float | None = None  # computed by rate_limit


class Faults:
    """A mutable, thread-safe set of fault rules, shared by a fake app and its tests."""

    def __init__(self, faults: Iterable[Fault | Mapping[str, Any]] = ()) -> None:
        self._lock = threading.Lock()
        self._rules: list[Fault] = []
        for f in faults:
            self.add(f)

    # --- management ------------------------------------------------------------------
    def add(self, fault: Fault | Mapping[str, Any] | None = None, /, **kw: Any) -> Fault:
        """Add a rule: ``add(Fault(...))``, ``add({"kind": "status", ...})`` or ``add(kind=..., ...)``."""
        if fault is None:
            fault = Fault.from_dict(kw)
        elif isinstance(fault, Mapping):
            fault = Fault.from_dict({**fault, **kw})
        elif kw:
            raise TypeError("pass either a Fault or keyword arguments")
        with self._lock:
            self._rules.append(fault)
        return fault

    def set(self, *faults: Fault | Mapping[str, Any]) -> list[Fault]:
        """Replace every rule with the given ones."""
        built = [f if isinstance(f, Fault) else Fault.from_dict(f) for f in faults]
        with self._lock:
            self._rules = built
        return built

    def remove(self, fault: Fault | int) -> bool:
        fid = fault.id if isinstance(fault, Fault) else fault
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != fid]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules = []

    @property
    def rules(self) -> list[Fault]:
        with self._lock:
            return [r for r in self._rules if not r.expired]

    def __len__(self) -> int:
        return len(self.rules)

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rules]

    # --- shortcuts -------------------------------------------------------------------
    def status(
        self,
        status: int = 503,
        *,
        count: int | None = None,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | str | None = None,
        should_retry: bool | None = None,
        processed: bool = False,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        """Answer ``status`` (e.g. ``faults.status(503, count=3)``)."""
        return self.add(
            Fault(
                "status",
                status=status,
                count=count,
                body=body,
                headers=dict(headers or {}),
                retry_after=retry_after,
                should_retry=should_retry,
                processed=processed,
                path=path,
                method=method,
                after=after,
            )
        )

    def too_many_requests(
        self,
        retry_after: float | str | None = 1,
        *,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
        headers: Mapping[str, str] | None = None,
        should_retry: bool | None = None,
    ) -> Fault:
        """Answer 429 with ``Retry-After``, in the provider's error shape."""
        return self.status(
            429,
            count=count,
            retry_after=retry_after,
            path=path,
            method=method,
            after=after,
            headers=headers,
            should_retry=should_retry,
        )

    def delay(
        self,
        seconds: float,
        *,
        phase: DelayPhase = "before",
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        return self.add(
            Fault("delay", seconds=seconds, phase=phase, count=count, path=path, method=method, after=after)
        )

    def drip(
        self,
        *,
        chunk_size: int = 1,
        interval: float = 0.05,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        return self.add(
            Fault(
                "drip",
                chunk_size=chunk_size,
                interval=interval,
                count=count,
                path=path,
                method=method,
                after=after,
            )
        )

    def hang(
        self,
        *,
        seconds: float = 3600.0,
        processed: bool = False,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        return self.add(
            Fault(
                "hang",
                seconds=seconds,
                processed=processed,
                count=count,
                path=path,
                method=method,
                after=after,
            )
        )

    def reset(
        self,
        *,
        processed: bool = False,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        return self.add(Fault("reset", processed=processed, count=count, path=path, method=method, after=after))

    def reset_mid_body(
        self,
        *,
        after_bytes: int | None = None,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        return self.add(
            Fault(
                "reset_mid_body",
                after_bytes=after_bytes,
                count=count,
                path=path,
                method=method,
                after=after,
            )
        )

    def truncate(
        self,
        *,
        extra_bytes: int = 100,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        return self.add(Fault("truncate", extra_bytes=extra_bytes, count=count, path=path, method=method, after=after))

    def garbage(
        self,
        data: bytes | str | None = None,
        *,
        processed: bool = False,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after: int = 0,
    ) -> Fault:
        text = data.decode("latin-1") if isinstance(data, bytes) else data
        return self.add(
            Fault(
                "garbage",
                data=text,
                processed=processed,
                count=count,
                path=path,
                method=method,
                after=after,
            )
        )

    def rate_limit(
        self,
        rate: float,
        *,
        burst: int | None = None,
        path: str | None = None,
        method: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Enforce ``rate`` requests/s (token bucket of size ``burst``); excess gets 429."""
        return self.add(
            Fault("rate_limit", rate=rate, burst=burst, path=path, method=method, headers=dict(headers or {}))
        )

    def outage(
        self,
        seconds: float,
        *,
        mode: FailMode = "status",
        status: int = 503,
        retry_after: float | str | None = None,
        processed: bool = False,
        path: str | None = None,
        method: str | None = None,
    ) -> Fault:
        """Fail every matching request for ``seconds`` from now."""
        return self.add(
            Fault(
                "outage",
                seconds=seconds,
                mode=mode,
                status=status,
                retry_after=retry_after,
                processed=processed,
                path=path,
                method=method,
            )
        )

    def random_errors(
        self,
        ratio: float,
        *,
        seed: int | None = 0,
        status: int = 500,
        mode: FailMode = "status",
        processed: bool = False,
        count: int | None = None,
        path: str | None = None,
        method: str | None = None,
    ) -> Fault:
        """Fail a ``ratio`` share of matching requests, reproducibly for a given ``seed``."""
        return self.add(
            Fault(
                "random",
                ratio=ratio,
                seed=seed,
                status=status,
                mode=mode,
                processed=processed,
                count=count,
                path=path,
                method=method,
                _explicit=frozenset({"status"}),
            )
        )

    # --- the decision ------------------------------------------------------------------
    def match(self, method: str, path: str) -> FaultHit | None:
        """Decide which fault (if any) applies to this request, and account for it."""
        now = time.monotonic()
        with self._lock:
            self._rules = [r for r in self._rules if not r.expired]
            for rule in self._rules:
                if not rule.matches(method, path):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after:
                    continue
                if rule.kind == "rate_limit":
                    burst = float(rule.burst or 1)
                    rule._tokens = min(burst, rule._tokens + (now - rule._stamp) * rule.rate)
                    rule._stamp = now
                    if rule._tokens >= 1.0:
                        rule._tokens -= 1.0
                        continue
                    wait = (1.0 - rule._tokens) / rule.rate
                    rule.hits += 1
                    return FaultHit(rule, "rate_limit", retry_after=wait)
                if rule.kind == "random":
                    assert rule._rng is not None
                    if rule._rng.random() >= rule.ratio:
                        continue
                rule.hits += 1
                return FaultHit(rule, rule.kind)
        return None


def parse_fault_specs(payload: Any) -> tuple[list[Fault], bool]:
    """Parse the JSON body of ``POST /__fake__/faults``.

    Accepted: one fault object; a list of them; or ``{"faults": [...], "replace": bool}``.
    Returns the faults and whether they replace the existing set.
    """
    replace = False
    if isinstance(payload, Mapping) and "faults" in payload:
        extra = set(payload) - {"faults", "replace"}
        if extra:
            raise FaultError(f"unknown field(s): {', '.join(sorted(extra))}")
        replace = bool(payload.get("replace", False))
        items = payload["faults"]
    elif isinstance(payload, Mapping):
        items = [payload]
    else:
        items = payload
    if not isinstance(items, list):
        raise FaultError('expected a fault object, a list, or {"faults": [...]}')
    out: list[Fault] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise FaultError("each fault must be an object")
        out.append(Fault.from_dict(cast(Mapping[str, Any], item)))
    return out, replace
