"""The typed policy: one `Policy` per upstream, exactly the blocks of contract section 3.

Every model is frozen and forbids unknown fields, so a typo is an error rather than a
silently ignored setting. Durations, sizes and rates are stored parsed (float seconds,
int bytes, `Rate`); the JSON Schema still shows them as the strings operators write.

Unit-less numbers for durations are refused when the input comes from a policy file
(the loader validates with context ``{"source": "yaml"}``); Python callers may pass
plain seconds (`Timeouts(attempt=0.5)`), which keeps tests and tooling simple.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from plugins.webhooks import WebhookSecrets
from proxy.config.units import (
    DURATION_PATTERN,
    RATE_PATTERN,
    SIZE_PATTERN,
    Rate,
    format_duration,
    parse_duration,
    parse_rate,
    parse_size,
)

__all__ = [
    "Auth",
    "Backoff",
    "BasicAuth",
    "Cache",
    "CircuitBreaker",
    "Crosswalk",
    "Failover",
    "HeaderAuth",
    "HeadersPolicy",
    "Idempotency",
    "Limits",
    "OAuthClientCredentials",
    "Policy",
    "Pool",
    "ProviderRef",
    "Queue",
    "RateLimit",
    "Retry",
    "RetryBudget",
    "Timeouts",
    "Tls",
    "Webhooks",
]

UPSTREAM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)
PROVIDER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*", re.ASCII)
HEADER_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
_CTL_RE = re.compile(r"[\r\n\x00]")


def _from_file(info: ValidationInfo) -> bool:
    ctx = info.context
    return isinstance(ctx, Mapping) and ctx.get("source") == "yaml"


# ---- durations, sizes, rates -------------------------------------------------------------


def _v_duration(v: Any, info: ValidationInfo) -> float:
    if not _from_file(info) and isinstance(v, int | float) and not isinstance(v, bool):
        # Python callers may give plain seconds.
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"bad duration {v}: must be a finite number of seconds >= 0")
        return float(v)
    return parse_duration(v)


def _v_positive_duration(v: float) -> float:
    if v <= 0:
        raise ValueError("must be more than 0 (e.g. 100ms, 30s)")
    return v


def _v_size(v: Any) -> int:
    return parse_size(v)


def _v_positive_size(v: int) -> int:
    if v <= 0:
        raise ValueError("must be more than 0 bytes (e.g. 1MiB)")
    return v


def _v_rate(v: Any) -> Rate:
    if isinstance(v, Rate):
        if not (v.count > 0 and v.per > 0 and math.isfinite(v.per_second)):
            raise ValueError("rate must be positive")
        return v
    return parse_rate(v)


_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": DURATION_PATTERN}, {"const": 0}],
    "description": "A duration: a number with a unit ms, s, m, h or d (250ms, 2s, 5m, 24h), or 0.",
}
_SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": SIZE_PATTERN}, {"type": "integer", "minimum": 0}],
    "description": "A size: bytes, or a number with B, KiB, MiB, GiB, KB, MB or GB (10MiB).",
}
_RATE_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": RATE_PATTERN,
    "description": "A rate: N/s, N/m or N/h (100/s); N positive, decimals allowed.",
}

Duration: TypeAlias = Annotated[float, BeforeValidator(_v_duration), WithJsonSchema(_DURATION_SCHEMA)]
PositiveDuration: TypeAlias = Annotated[
    float,
    BeforeValidator(_v_duration),
    AfterValidator(_v_positive_duration),
    WithJsonSchema(_DURATION_SCHEMA),
]
Size: TypeAlias = Annotated[int, BeforeValidator(_v_size), WithJsonSchema(_SIZE_SCHEMA)]
PositiveSize: TypeAlias = Annotated[
    int, BeforeValidator(_v_size), AfterValidator(_v_positive_size), WithJsonSchema(_SIZE_SCHEMA)
]
RateValue: TypeAlias = Annotated[
    Rate,
    PlainValidator(_v_rate),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(_RATE_SCHEMA),
]


# ---- names, headers, URLs ----------------------------------------------------------------


def _v_upstream_name(v: str) -> str:
    if not UPSTREAM_NAME_RE.fullmatch(v):
        raise ValueError(
            f"bad upstream name {v[:70]!r}: use lowercase letters, digits and '-', "
            "starting with a letter or digit, at most 63 characters"
        )
    return v


def _v_provider_name(v: str) -> str:
    if not PROVIDER_NAME_RE.fullmatch(v) or len(v) > 64:
        raise ValueError(
            f"bad provider name {v[:70]!r}: use lowercase letters, digits, '_', '.' and '-' "
            "(a plugin name such as stripe, paypal, sendgrid, mailgun or generic)"
        )
    return v


def _v_header_name(v: str) -> str:
    if not HEADER_TOKEN_RE.fullmatch(v):
        raise ValueError(f"bad header name {v[:70]!r}: use letters, digits and !#$%&'*+-.^_`|~ only")
    return v


def _v_header_value(v: str) -> str:
    if _CTL_RE.search(v):
        raise ValueError("a header value must not contain CR, LF or NUL")
    return v


def _reject_control_characters(value: Any, what: str) -> None:
    """Raise for CR, LF or NUL anywhere in the strings of a settings tree."""
    if isinstance(value, str):
        if _CTL_RE.search(value):
            raise ValueError(f"a {what} must not contain CR, LF or NUL")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _reject_control_characters(key, what)
            _reject_control_characters(item, what)
    elif isinstance(value, list | tuple):
        for item in value:
            _reject_control_characters(item, what)


def _v_header_secret(v: SecretStr) -> SecretStr:
    if _CTL_RE.search(v.get_secret_value()):
        # Never echo the value: it is a secret.
        raise ValueError("a secret sent in a header must not contain CR, LF or NUL")
    return v


def _v_http_url(v: str, *, base: bool) -> str:
    what = "target" if base else "URL"
    if v != v.strip() or any(c.isspace() for c in v):
        raise ValueError(f"bad {what}: must not contain spaces")
    try:
        parts = urlsplit(v)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad {what} {v[:100]!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"bad {what} {v[:100]!r}: must be an absolute http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"bad {what} {v[:100]!r}: has no host")
    if "@" in parts.netloc:
        raise ValueError(f"bad {what}: must not carry user:password@ (use auth: instead)")
    if port == 0:
        raise ValueError(f"bad {what} {v[:100]!r}: port 0")
    if base and ("?" in v or "#" in v):
        raise ValueError(f"bad {what} {v[:100]!r}: must not have a query (?) or fragment (#)")
    if not base:
        return v
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc}{path}"


def _v_target(v: str) -> str:
    return _v_http_url(v, base=True)


def _v_url(v: str) -> str:
    return _v_http_url(v, base=False)


def _v_listen(v: Any) -> Any:
    if isinstance(v, list | dict):
        raise ValueError('listen must be a string HOST:PORT; quote IPv6 forms: listen: "[::1]:8101"')
    if not isinstance(v, str):
        raise ValueError("listen must be a string HOST:PORT, e.g. 127.0.0.1:8101")
    host, port_text = split_host_port(v)
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        raise ValueError(f"bad listen {v[:80]!r}: port must be a number 0..65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"bad listen {v[:80]!r}: not an IPv6 address in [...]") from None
    elif not host or not re.fullmatch(r"[A-Za-z0-9.-]+", host, re.ASCII):
        raise ValueError(f"bad listen {v[:80]!r}: use HOST:PORT, e.g. 127.0.0.1:8101 or [::1]:8101")
    return f"{host}:{int(port_text)}"


def split_host_port(v: str) -> tuple[str, str]:
    """`127.0.0.1:8101` -> (`127.0.0.1`, `8101`); `[::1]:80` -> (`[::1]`, `80`)."""
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or v[end + 1 : end + 2] != ":":
            raise ValueError(f"bad listen {v[:80]!r}: use [IPv6]:PORT, e.g. [::1]:8101")
        return v[: end + 1], v[end + 2 :]
    host, sep, port = v.rpartition(":")
    if not sep or ":" in host:
        raise ValueError(f"bad listen {v[:80]!r}: use HOST:PORT, e.g. 127.0.0.1:8101 (IPv6: [::1]:8101)")
    return host, port


UpstreamName: TypeAlias = Annotated[str, AfterValidator(_v_upstream_name)]
HeaderName: TypeAlias = Annotated[str, AfterValidator(_v_header_name)]
HeaderValue: TypeAlias = Annotated[str, AfterValidator(_v_header_value)]
HeaderSecret: TypeAlias = Annotated[SecretStr, AfterValidator(_v_header_secret)]
HttpUrl: TypeAlias = Annotated[str, AfterValidator(_v_url)]


# ---- condition lists ---------------------------------------------------------------------

RetryWord = Literal["connect_error", "timeout", "reset"]
FailoverWord = Literal["circuit_open", "exhausted", "connect_error", "timeout"]
RETRY_WORDS: tuple[str, ...] = ("connect_error", "timeout", "reset")
FAILOVER_WORDS: tuple[str, ...] = ("circuit_open", "exhausted", "connect_error", "timeout")


def _condition(v: Any, words: tuple[str, ...]) -> int | str:
    allowed = "a status code 400-599 or one of " + ", ".join(words)
    if isinstance(v, bool):
        raise ValueError(f"bad condition {v}: use {allowed}")
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, int):
        if 400 <= v <= 599:
            return v
        raise ValueError(f"bad status code {v}: use {allowed}")
    if isinstance(v, str) and v in words:
        return v
    shown = repr(v[:40]) if isinstance(v, str) else type(v).__name__
    raise ValueError(f"unknown condition {shown}: use {allowed}")


def _v_retry_on(v: Any) -> int | str:
    return _condition(v, RETRY_WORDS)


def _v_failover_on(v: Any) -> int | str:
    return _condition(v, FAILOVER_WORDS)


RetryCondition: TypeAlias = Annotated[
    int | RetryWord,
    PlainValidator(_v_retry_on),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 400, "maximum": 599}, {"enum": list(RETRY_WORDS)}]}),
]
FailoverCondition: TypeAlias = Annotated[
    int | FailoverWord,
    PlainValidator(_v_failover_on),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 400, "maximum": 599}, {"enum": list(FAILOVER_WORDS)}]}),
]


# ---- models ------------------------------------------------------------------------------


class _Model(BaseModel):
    # hide_input_in_errors: a ValidationError's text must never show a secret it was given.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class ProviderRef(_Model):
    """`stripe`, or `{name: mailgun, domain: mg.example.com}`: extra keys become settings."""

    name: Annotated[str, AfterValidator(_v_provider_name)]
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, Mapping) and not isinstance(v, BaseModel):
            if set(v) <= {"name", "settings"} and isinstance(v.get("settings", {}), Mapping):
                return v  # already the long form (e.g. a model_dump)
            rest = {k: val for k, val in v.items() if k != "name"}
            out: dict[str, Any] = {"settings": rest}
            if "name" in v:
                out["name"] = v["name"]
            return out
        return v

    @field_validator("settings")
    @classmethod
    def _no_control_characters(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Plugins put settings into request paths and headers (Mailgun's domain goes into
        # /v3/{domain}/messages): CR, LF or NUL there would inject into the request.
        _reject_control_characters(v, "provider setting")
        return v

    @model_validator(mode="after")
    def _mailgun_domain_is_a_hostname(self) -> ProviderRef:
        domain = self.settings.get("domain")
        if self.name == "mailgun" and domain is not None:
            if not isinstance(domain, str) or not _HOSTNAME_RE.fullmatch(domain):
                raise ValueError(f"mailgun domain {str(domain)[:80]!r} is not a host name (like mg.example.com)")
        return self


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$)(?:{_LABEL}\.)*{_LABEL}")

_PROVIDER_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": "^" + PROVIDER_NAME_RE.pattern + "$"},
        {
            "type": "object",
            "properties": {"name": {"type": "string", "pattern": "^" + PROVIDER_NAME_RE.pattern + "$"}},
            "required": ["name"],
            "additionalProperties": True,
        },
    ],
    "description": "Provider plugin: a name (stripe), or {name: mailgun, domain: ...} with settings.",
    "default": "generic",
}


class BasicAuth(_Model):
    username: str = Field(min_length=1)
    password: HeaderSecret

    @field_validator("username")
    @classmethod
    def _no_colon(cls, v: str) -> str:
        if ":" in v or _CTL_RE.search(v):
            raise ValueError("a basic-auth username must not contain ':', CR, LF or NUL")
        return v


class HeaderAuth(_Model):
    name: HeaderName
    value: HeaderSecret


class OAuthClientCredentials(_Model):
    token_url: HttpUrl
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    scope: str | None = None


AUTH_KINDS: tuple[str, ...] = ("bearer", "basic", "header", "oauth_client_credentials")


class Auth(_Model):
    """Credentials the proxy sends upstream, replacing what the app sent. Exactly one kind."""

    bearer: HeaderSecret | None = None
    basic: BasicAuth | None = None
    header: HeaderAuth | None = None
    oauth_client_credentials: OAuthClientCredentials | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Auth:
        given = [k for k in AUTH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            detail = "none given" if not given else "got " + ", ".join(given)
            raise ValueError(f"set exactly one of {', '.join(AUTH_KINDS)} ({detail})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in AUTH_KINDS if getattr(self, k) is not None)


class HeadersPolicy(_Model):
    add: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    remove: list[HeaderName] = Field(default_factory=list)

    def __repr_args__(self) -> Any:
        # Values may hold secrets resolved from ${env:}/${file:}: show names only.
        yield "add", {k: "***" for k in self.add}
        yield "remove", self.remove


class Tls(_Model):
    verify: bool = True
    ca_file: str | None = None


class Timeouts(_Model):
    connect: PositiveDuration = Field(default="2s", validate_default=True)
    attempt: PositiveDuration = Field(default="30s", validate_default=True)
    total: PositiveDuration = Field(default="60s", validate_default=True)

    @field_validator("total")
    @classmethod
    def _total_covers_attempt(cls, v: float, info: ValidationInfo) -> float:
        attempt = info.data.get("attempt")
        if isinstance(attempt, float) and attempt > v:
            raise ValueError(f"total ({format_duration(v)}) must be at least attempt ({format_duration(attempt)})")
        return v


class Limits(_Model):
    max_body: PositiveSize = Field(default="10MiB", validate_default=True)
    max_concurrency: int = Field(default=200, ge=1)


class Pool(_Model):
    """The upstream's connection pool (docs/policy-reference.md, "pool").

    The defaults are the pool's behaviour before this block existed: idle connections are
    kept up to `limits.max_concurrency` for 30 s, and nothing is connected ahead of a call.
    """

    # Idle connections kept at most; None: as many as limits.max_concurrency.
    max_idle: int | None = Field(default=None, ge=0)
    # An idle connection is closed after this long (sooner when the upstream's
    # `Keep-Alive: timeout=N` says so); a warm one is replaced before then.
    idle_timeout: PositiveDuration = Field(default="30s", validate_default=True)
    # Idle connections kept open and ready at all times, connected in the background (at
    # start-up, on reload, and again before each expires).
    min_warm: int = Field(default=0, ge=0, le=1000)

    @model_validator(mode="after")
    def _warm_fits_idle(self) -> Pool:
        if self.max_idle is not None and self.min_warm > self.max_idle:
            raise ValueError(f"min_warm ({self.min_warm}) must not be more than max_idle ({self.max_idle})")
        return self


class Queue(_Model):
    max_wait: PositiveDuration
    max_size: int = Field(default=10000, ge=1)


class RateLimit(_Model):
    rate: RateValue
    burst: int = Field(default=1, ge=1)
    shared: bool = False
    queue: Queue | None = None
    respect_upstream: bool = True


class Backoff(_Model):
    initial: PositiveDuration = Field(default="100ms", validate_default=True)
    max: PositiveDuration = Field(default="10s", validate_default=True)
    multiplier: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    jitter: Literal["full", "equal", "none"] = "full"

    @field_validator("max")
    @classmethod
    def _max_covers_initial(cls, v: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial")
        if isinstance(initial, float) and initial > v:
            raise ValueError(f"max ({format_duration(v)}) must be at least initial ({format_duration(initial)})")
        return v


class RetryBudget(_Model):
    ratio: float = Field(default=0.2, gt=0, le=1)
    min_per_second: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    window: PositiveDuration = Field(default="10s", validate_default=True)


DEFAULT_RETRY_ON: tuple[int | RetryWord, ...] = (429, 502, 503, 504, "connect_error", "timeout")


class Retry(_Model):
    attempts: int = Field(default=3, ge=1)
    backoff: Backoff = Field(default_factory=Backoff)
    on: list[RetryCondition] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    retry_after: Literal["honor", "ignore"] = "honor"
    # Cap on the wait an upstream may ask for through Retry-After: a longer ask is not
    # waited out; the upstream's answer goes back to the app at once.
    max_retry_after: PositiveDuration = Field(default="60s", validate_default=True)
    budget: RetryBudget | None = None


class Idempotency(_Model):
    header: HeaderName = "Idempotency-Key"
    generate: bool = True
    replay_ttl: Duration = Field(default="24h", validate_default=True)
    fingerprint_window: Duration = Field(default="0s", validate_default=True)
    max_entries: int = Field(default=100000, ge=1)
    # Does the upstream itself deduplicate requests carrying `header`? Then an unsafe call
    # with a key may be retried even after it may have reached the upstream. None: the
    # provider plugin knows (Stripe and PayPal yes; SendGrid, Mailgun and generic no).
    upstream_dedupes: bool | None = None


CacheMethod = Literal["GET", "HEAD"]


def _default_methods() -> list[CacheMethod]:
    return ["GET"]


def _upper_methods(v: Any) -> Any:
    if isinstance(v, list):
        return [m.upper() if isinstance(m, str) else m for m in v]
    return v


class Cache(_Model):
    ttl: PositiveDuration
    methods: Annotated[list[CacheMethod], BeforeValidator(_upper_methods)] = Field(
        default_factory=lambda: _default_methods(), min_length=1
    )
    max_entries: int = Field(default=10000, ge=1)
    max_entry_size: PositiveSize = Field(default="1MiB", validate_default=True)
    stale_if_error: Duration = Field(default="0s", validate_default=True)


class CircuitBreaker(_Model):
    window: PositiveDuration = Field(default="30s", validate_default=True)
    min_requests: int = Field(default=20, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    open_for: PositiveDuration = Field(default="30s", validate_default=True)
    half_open_requests: int = Field(default=3, ge=1)


#: Providers whose calls need a synchronous result: an outbox cannot answer for them.
SYNCHRONOUS_PROVIDERS = frozenset({"stripe", "paypal"})


class Outbox(_Model):
    """Deferred sends (contract 7.6, docs/outbox.md)."""

    # on_failure: send now; keep the send when it failed without reaching the upstream.
    # always: keep every send and answer "accepted" at once.
    when: Literal["on_failure", "always"] = "on_failure"
    max_age: PositiveDuration = Field(default="24h", validate_default=True)
    max_entries: int = Field(default=100000, ge=1)
    # Deliveries in flight at once, per process (each still waits its turn in rate_limit).
    concurrency: int = Field(default=16, ge=1, le=1000)
    # After an ambiguous delivery (or a process killed while sending), how long to wait
    # before asking the provider whether it took the send (its event index lags).
    probe_after: PositiveDuration = Field(default="60s", validate_default=True)
    # on_failure only: also keep a send whose outcome is ambiguous (a 5xx, a timeout after
    # it was written), where the provider can be asked whether it has it; every send then
    # carries egressd's id, and the worker asks after probe_after (docs/outbox.md).
    keep_in_doubt: bool = False


class Webhooks(_Model):
    """Inbound webhooks (contract 7.5, docs/webhooks.md): the provider posts to egressd's
    webhook listener at `/<upstream>`; egressd verifies, stores and delivers to `deliver_to`."""

    # The app's endpoint. Optional on an upstream that is only a failover fallback: its
    # translated events go to the primary's deliver_to (contract 7.8).
    deliver_to: HttpUrl | None = None
    # stripe: the endpoint's signing secret (whsec_...); mailgun: the HTTP webhook signing key.
    secret: SecretStr | None = None
    # sendgrid: the Signed Event Webhook public key (base64 DER, or PEM).
    public_key: str | None = None
    # sendgrid: a PEM ECDSA P-256 private key egressd signs deliveries to the app with.
    signing_key: SecretStr | None = None
    # paypal: the webhook subscription id (checked with PayPal's verify API).
    webhook_id: str | None = None
    tolerance: PositiveDuration = Field(default="5m", validate_default=True)
    dedupe_for: PositiveDuration = Field(default="7d", validate_default=True)
    max_age: PositiveDuration = Field(default="3d", validate_default=True)

    @field_validator("public_key", "webhook_id")
    @classmethod
    def _not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    def webhook_secrets(self) -> WebhookSecrets:
        """The secrets as the plugins take them."""
        return WebhookSecrets(
            secret=self.secret.get_secret_value() if self.secret is not None else None,
            public_key=self.public_key,
            signing_key=self.signing_key.get_secret_value() if self.signing_key is not None else None,
            webhook_id=self.webhook_id,
        )


class Crosswalk(_Model):
    """Ids that exist on both providers and cannot be computed (primary id -> fallback id)."""

    payment_methods: dict[str, str] = Field(default_factory=dict)
    templates: dict[str, str] = Field(default_factory=dict)

    @field_validator("payment_methods", "templates")
    @classmethod
    def _no_control_characters(cls, v: dict[str, str]) -> dict[str, str]:
        _reject_control_characters(v, "crosswalk id")
        return v


class Failover(_Model):
    to: UpstreamName
    on: list[FailoverCondition] = Field(min_length=1)
    crosswalk: Crosswalk = Field(default_factory=Crosswalk)
    # Loaded by the loader into `crosswalk` (kept here for reference and for reloads).
    crosswalk_file: str | None = None
    # Permit a failover that would drop fields the fallback cannot express.
    allow_lossy: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_crosswalk_source(cls, v: Any, info: ValidationInfo) -> Any:
        ctx = info.context
        loaded = isinstance(ctx, Mapping) and ctx.get("crosswalk_files_loaded")
        if isinstance(v, Mapping) and "crosswalk" in v and "crosswalk_file" in v and not loaded:
            raise ValueError("give crosswalk or crosswalk_file, not both")
        return v


class Policy(_Model):
    """One upstream: where it is, how to reach it, and what the proxy does for its calls."""

    upstream: UpstreamName
    target: Annotated[str, AfterValidator(_v_target)]
    provider: Annotated[ProviderRef, WithJsonSchema(_PROVIDER_SCHEMA)] = Field(
        default_factory=lambda: ProviderRef(name="generic")
    )
    listen: Annotated[str | None, BeforeValidator(lambda v: v if v is None else _v_listen(v))] = None
    auth: Auth | None = None
    headers: HeadersPolicy = Field(default_factory=HeadersPolicy)
    tls: Tls = Field(default_factory=Tls)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)
    pool: Pool = Field(default_factory=Pool)
    rate_limit: RateLimit | None = None
    retry: Retry | None = None
    idempotency: Idempotency | None = None
    cache: Cache | None = None
    circuit_breaker: CircuitBreaker | None = None
    failover: list[Failover] = Field(default_factory=list)
    outbox: Outbox | None = None
    webhooks: Webhooks | None = None

    _fingerprints: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _warm_fits_concurrency(self) -> Policy:
        if self.pool.min_warm > self.limits.max_concurrency:
            raise ValueError(
                f"pool.min_warm ({self.pool.min_warm}) must not be more than limits.max_concurrency "
                f"({self.limits.max_concurrency}): warm connections count against it"
            )
        return self

    @model_validator(mode="after")
    def _outbox_needs_an_asynchronous_provider(self) -> Policy:
        if self.outbox is not None and self.provider.name in SYNCHRONOUS_PROVIDERS:
            raise ValueError(
                f"outbox is not allowed for provider {self.provider.name}: its calls need a synchronous "
                "result (a payment's outcome), which a kept send cannot give; use it on e-mail upstreams "
                "(sendgrid, mailgun) or a generic API whose provider only queues"
            )
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """(host, port) of the dedicated listener; IPv6 hosts without brackets."""
        if self.listen is None:
            return None
        host, port = split_host_port(self.listen)
        return host.strip("[]"), int(port)

    def fingerprint(self, *sections: str) -> str:
        """sha256 (hex) of the canonical JSON of the named sections, or of the whole policy.

        Secrets count (a changed key changes the fingerprint) but never leave the hash.
        """
        fields = type(self).model_fields
        for name in sections:
            if name not in fields:
                raise ValueError(f"no policy section {name!r}")
        key = tuple(sections)
        cached = self._fingerprints.get(key)
        if cached is None:
            names = key or tuple(fields)
            data = {name: _canonical(getattr(self, name)) for name in names}
            text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
            cached = hashlib.sha256(text.encode()).hexdigest()
            self._fingerprints[key] = cached
        return cached


def _canonical(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return {name: _canonical(getattr(v, name)) for name in type(v).model_fields}
    if isinstance(v, SecretStr):
        return {"secret": v.get_secret_value()}
    if isinstance(v, Rate):
        return {"count": v.count, "per": v.per}
    if isinstance(v, Mapping):
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_canonical(x) for x in v]
    return v
