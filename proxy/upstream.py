"""The attempt loop: every attempt a call makes at its upstream, in one readable loop.

This is the innermost step of a pipeline (proxy/pipeline.py), right before the terminal
sender (`Transport.send`, or `OAuthSender.send` for `auth: oauth_client_credentials`).
Like Envoy's router asking its cluster's circuit breakers and retry state before each
try, it owns the attempts of a call; nothing else resends. Per call:

    retry.begin            buffer a small streamed body; count the request in the budget
    loop, one attempt at a time:
        breaker.admit      circuit open -> the attempt's result is ProxyError circuit_open
        limiter.admit      a free slot now, or wait in the queue, or rate_limited
        send               the terminal: one request upstream (with a Bearer token: auth)
        limiter.pause      the answer asks every caller to wait (429 + Retry-After,
                           X-RateLimit-Remaining: 0)
        breaker.record     5xx / upstream_unreachable / upstream_timeout = failure;
                           no verdict (a rate-limit refusal, a cancellation): a half-open
                           trial slot is given back (finally)
        token rejected?    401 with a cached token (auth): refresh the token, one more
                           attempt, through the breaker and the limiter again; not
                           at the provider's own token endpoint (sent with the app's
                           credentials, no token: its 401 is the app's answer)
        retry.decide       wait (backoff, Retry-After, budget, deadline) and go round,
                           or finish: attempts, exhausted, retry_skipped on the result

`retry` is a `RetryPolicy` (proxy/stages/retry.py), `breaker` a `CircuitBreaker`
(circuit.py), `limiter` a `RateLimiter` (ratelimit.py): plain objects whose steps are
synchronous when the state lives in process memory (`*_now`) and coroutines when the
state backend has only async operations (Redis). A policy without one of the blocks has
None in its place and pays one `is None` test for it; a policy with none of them (and
no OAuth) has no loop at all: its pipeline calls the terminal directly.

The order of the steps, state operations and events is exactly that of the three nested
wrappers this loop replaces (retry outside circuit outside rate limit);
tests/test_guard_equivalence.py holds it to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.errors import ProxyError
from proxy.model import Call, Response
from proxy.stages.circuit import FAILURE_CODES

if TYPE_CHECKING:
    from proxy.oauth import OAuthSender
    from proxy.pipeline import Handler
    from proxy.stages.circuit import CircuitBreaker
    from proxy.stages.ratelimit import RateLimiter
    from proxy.stages.retry import RetryPolicy


def attempt_loop(
    send: Handler,
    *,
    retry: RetryPolicy | None = None,
    breaker: CircuitBreaker | None = None,
    limiter: RateLimiter | None = None,
    auth: OAuthSender | None = None,
) -> Handler:
    """The attempt loop of one upstream under one policy, as a handler `call -> Response`.

    Built once per configuration load by `build_pipeline`. `send` is the terminal (one
    attempt upstream); with `auth`, attempts go through `auth.send` instead, which adds
    the token. The result is a closure, not an object with a method: the objects and
    whether each has its synchronous face are fixed for its life, so every call reads
    them from cells and takes no attribute lookups for them.
    """
    breaker_sync = breaker is not None and breaker.sync is not None
    pause_sync = limiter is not None and limiter.pause_sync is not None

    async def run(call: Call) -> Response:
        # -- once per call ------------------------------------------------------------------
        if retry is not None and not retry.begin_now(call):
            await retry.begin(call)
        attempt = 0  # attempts the retry policy counts
        refreshed = 0  # extra attempts made with a refreshed token (auth)
        rejected: str | None = None  # the token the upstream refused
        token = ""
        result: Response | ProxyError
        while True:
            attempt += 1
            # -- one attempt: breaker, limiter, send, what the answer says --------------------
            trial = False
            try:
                if breaker is not None:
                    trial = breaker.admit_now() if breaker_sync else await breaker.admit()
            except ProxyError as refused:  # circuit_open: the attempt's result
                result = refused
            else:
                failure: bool | None = None  # the breaker's verdict; None: none
                try:
                    if limiter is not None and not limiter.admit_now():
                        await limiter.admit(call)
                    if auth is None:
                        result = await send(call)
                    else:
                        result, token = await auth.send(call, rejected)
                    if limiter is not None:
                        wait = limiter.pause_asked(result)
                        if wait is not None:
                            if pause_sync:
                                limiter.pause_now(wait)
                            else:
                                await limiter.pause(wait)
                    failure = result.status >= 500
                except ProxyError as exc:
                    result = exc
                    if exc.code in FAILURE_CODES:
                        failure = True
                finally:
                    if breaker is not None:
                        if failure is not None:
                            if breaker_sync:
                                breaker.record_now(failure, trial)
                            else:
                                await breaker.record(failure, trial)
                        elif trial:
                            if breaker_sync:
                                breaker.release_now()
                            else:
                                await breaker.release()
            # -- token rejected: refresh it and make one more attempt (auth) ------------------
            if (
                auth is not None
                and token
                and type(result) is Response
                and result.status == 401
                and call.body.replayable
            ):
                await result.close()
                if rejected is None:
                    rejected = token
                    refreshed += 1
                    attempt -= 1  # not a retry: the retry policy does not count it
                    continue
                result = auth.refused(call)
            # -- retry or finish ----------------------------------------------------------------
            if retry is None:
                if refreshed:
                    result.attempts = attempt + refreshed
                if type(result) is Response:
                    return result
                assert isinstance(result, ProxyError)
                raise result
            if retry.settled(result):
                result.attempts = attempt + refreshed
                assert type(result) is Response
                return result
            skip = await retry.decide(call, result, attempt)
            if not isinstance(skip, float):
                return retry.finish(result, attempt + refreshed, skip)
            if call.story is not None:
                call.story.held_seconds += skip  # the back-off: a wait the policy asked for
            await retry.wait(result, skip)

    return run
