"""Policy loading: every problem is one exact line with the right line number; never a raise."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.config import (
    LoadResult,
    Policy,
    Problem,
    Rate,
    Timeouts,
    load_policy_dir,
    policy_json_schema,
)

REPO = Path(__file__).resolve().parent.parent
MINIMAL = "upstream: api\ntarget: https://api.example.com\n"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(directory: Path, **kwargs: Any) -> LoadResult:
    kwargs.setdefault("environ", {})
    return load_policy_dir(directory, **kwargs)


def lines(result: LoadResult) -> list[str]:
    return [str(p) for p in result.problems]


def one_problem(directory: Path, text: str, **kwargs: Any) -> str:
    f = write(directory, "p.yaml", text)
    result = load(directory, **kwargs)
    assert len(result.problems) == 1, lines(result)
    assert result.policy_set is None
    return str(result.problems[0]).replace(str(f), "p.yaml")


# ---- happy path --------------------------------------------------------------------------


def test_minimal_policy_gets_defaults(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL)
    result = load(tmp_path)
    assert result.ok and result.problems == ()
    assert result.policy_set is not None
    policy = result.policy_set.by_name()["api"]
    assert policy.provider.name == "generic" and policy.provider.settings == {}
    assert (policy.timeouts.connect, policy.timeouts.attempt, policy.timeouts.total) == (2.0, 30.0, 60.0)
    assert policy.limits.max_body == 10 * 1024 * 1024 and policy.limits.max_concurrency == 200
    assert policy.tls.verify is True and policy.tls.ca_file is None
    for block in ("auth", "rate_limit", "retry", "idempotency", "cache", "circuit_breaker", "listen"):
        assert getattr(policy, block) is None
    assert policy.failover == []
    assert result.policy_set.files == (str(tmp_path / "a.yaml"),)
    assert len(result.policy_set.version) == 12


def test_full_policy_parses_every_block(tmp_path: Path) -> None:
    write(
        tmp_path,
        "full.yaml",
        """
        upstream: stripe
        target: https://api.stripe.com/v1/
        provider: {name: mailgun, domain: mg.example.com}
        listen: "[::1]:8101"
        auth: {basic: {username: api, password: hunter2}}
        headers: {add: {X-Team: payments}, remove: [X-Internal-Debug]}
        tls: {verify: true}
        timeouts: {connect: 250ms, attempt: 5s, total: 1m}
        limits: {max_body: 1MiB, max_concurrency: 10}
        rate_limit:
          rate: 100/s
          burst: 20
          shared: true
          queue: {max_wait: 5s}
          respect_upstream: false
        retry:
          attempts: 4
          backoff: {initial: 100ms, max: 10s, multiplier: 3, jitter: equal}
          on: [429, 500, connect_error, timeout, reset]
          retry_after: ignore
          max_retry_after: 2m
          budget: {ratio: 0.2, min_per_second: 5}
        idempotency: {header: Idempotency-Key, generate: false, replay_ttl: 0, fingerprint_window: 10s}
        cache: {ttl: 60s, methods: [get, HEAD], stale_if_error: 10m}
        circuit_breaker: {window: 30s, min_requests: 5, failure_rate: 1, open_for: 10s, half_open_requests: 1}
        failover:
          - to: other
            on: [circuit_open, exhausted, 503]
            crosswalk: {payment_methods: {pm_card_visa: 8TX02017P3456}}
            allow_lossy: true
        ---
        upstream: other
        target: http://localhost:9000
        provider: sendgrid
        auth: {bearer: SG.proxy-key}
        """,
    )
    result = load(tmp_path)
    assert result.ok, lines(result)
    assert result.policy_set is not None
    p = result.policy_set.by_name()["stripe"]
    assert p.target == "https://api.stripe.com/v1"
    assert p.provider.name == "mailgun" and p.provider.settings == {"domain": "mg.example.com"}
    assert p.listen == "[::1]:8101" and p.listen_address == ("::1", 8101)
    assert p.auth is not None and p.auth.kind == "basic" and p.auth.basic is not None
    assert p.auth.basic.password.get_secret_value() == "hunter2"
    assert p.timeouts.connect == 0.25 and p.timeouts.total == 60.0
    assert p.limits.max_body == 1024 * 1024
    assert p.rate_limit is not None and p.rate_limit.rate == Rate(100, 1)
    assert p.rate_limit.queue is not None and p.rate_limit.queue.max_size == 10000
    assert p.retry is not None and p.retry.on == [429, 500, "connect_error", "timeout", "reset"]
    assert p.retry.backoff.jitter == "equal" and p.retry.max_retry_after == 120.0
    assert p.retry.budget is not None and p.retry.budget.window == 10.0
    assert p.idempotency is not None and p.idempotency.replay_ttl == 0.0
    assert p.cache is not None and p.cache.methods == ["GET", "HEAD"] and p.cache.max_entry_size == 1024 * 1024
    assert p.circuit_breaker is not None and p.circuit_breaker.failure_rate == 1.0
    assert p.failover[0].on == ["circuit_open", "exhausted", 503]
    assert p.failover[0].crosswalk.payment_methods == {"pm_card_visa": "8TX02017P3456"}
    assert [q.upstream for q in result.policy_set.policies] == ["stripe", "other"]


def test_retry_defaults(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL + "retry: {}\n")
    result = load(tmp_path)
    assert result.policy_set is not None
    retry = result.policy_set.policies[0].retry
    assert retry is not None
    assert retry.attempts == 3 and retry.retry_after == "honor" and retry.max_retry_after == 60.0
    assert retry.on == [429, 502, 503, 504, "connect_error", "timeout"]
    assert (retry.backoff.initial, retry.backoff.max, retry.backoff.multiplier) == (0.1, 10.0, 2.0)


# The shipped failover plans need egressd's own credentials for each fallback.
SHIPPED_SECRETS = {"PAYPAL_CLIENT_ID": "id", "PAYPAL_CLIENT_SECRET": "secret", "MAILGUN_API_KEY": "key-1"}
SHIPPED_UNSET = [
    ("mailgun.yaml", 20, "mailgun", "auth.basic.password", "MAILGUN_API_KEY"),
    ("paypal.yaml", 25, "paypal", "auth.oauth_client_credentials.client_id", "PAYPAL_CLIENT_ID"),
    ("paypal.yaml", 26, "paypal", "auth.oauth_client_credentials.client_secret", "PAYPAL_CLIENT_SECRET"),
]


def test_shipped_policies_need_the_fallback_secrets_to_run() -> None:
    """`run` refuses the examples without the three variables and names exactly them;
    `check` passes without them, with one warning each."""
    policies = REPO / "policies"
    strict = load_policy_dir(policies, secrets="strict", environ={})
    assert lines(strict) == [
        f"{policies / name}:{line}: upstream {up}: {where}: environment variable {var} is not set"
        for name, line, up, where, var in SHIPPED_UNSET
    ]
    assert strict.policy_set is None
    lenient = load_policy_dir(policies, secrets="lenient", environ={})
    assert lines(lenient) == [
        f"{policies / name}:{line}: warning: upstream {up}: {where}: environment variable {var} is not set "
        "(an error for egressd run)"
        for name, line, up, where, var in SHIPPED_UNSET
    ]
    assert lenient.ok and lenient.policy_set is not None


def test_shipped_policies_load_clean() -> None:
    modes: tuple[Literal["strict", "lenient"], ...] = ("strict", "lenient")
    for mode in modes:
        result = load_policy_dir(REPO / "policies", secrets=mode, environ=SHIPPED_SECRETS)
        assert result.problems == (), lines(result)
        assert result.policy_set is not None
        names = result.policy_set.by_name()
        assert set(names) == {"stripe", "stripe-files", "paypal", "sendgrid", "mailgun"}
        assert names["stripe"].failover[0].to == "paypal"
        assert names["sendgrid"].failover[0].to == "mailgun"
        assert names["mailgun"].provider.settings == {"domain": "mg.example.com"}
        paypal_auth, mailgun_auth = names["paypal"].auth, names["mailgun"].auth
        assert paypal_auth is not None and paypal_auth.oauth_client_credentials is not None
        assert paypal_auth.oauth_client_credentials.client_id == "id"
        assert mailgun_auth is not None and mailgun_auth.basic is not None
        assert mailgun_auth.basic.password.get_secret_value() == "key-1"


def test_multi_document_file_and_empty_documents(tmp_path: Path) -> None:
    write(
        tmp_path,
        "many.yml",
        """
        ---
        ---
        upstream: a
        target: https://a.example
        ---
        # only a comment
        ---
        upstream: b
        target: https://b.example
        retry: {attempts: 0}
        """,
    )
    result = load(tmp_path)
    assert [p.replace(str(tmp_path) + "/", "") for p in lines(result)] == [
        "many.yml:10: upstream b: retry.attempts: should be greater than or equal to 1"
    ]


def test_hidden_and_backup_files_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL)
    for name in (".#a.yaml", "a.yaml~", ".hidden.yaml", "notes.txt", "a.yaml.bak"):
        write(tmp_path, name, "garbage: [")
    (tmp_path / "sub.yaml").mkdir()
    result = load(tmp_path)
    assert result.ok and result.problems == ()
    assert result.policy_set is not None and len(result.policy_set.files) == 1


def test_version_changes_with_content(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL)
    first = load(tmp_path).policy_set
    assert first is not None and load(tmp_path).policy_set == first
    write(tmp_path, "a.yaml", MINIMAL + "# a comment\n")
    second = load(tmp_path).policy_set
    assert second is not None and second.version != first.version


# ---- one exact line per problem ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + "retyr: {}\n",
            "p.yaml:3: upstream api: retyr: unknown field, did you mean 'retry'? (allowed: upstream, target, "
            "provider, listen, auth, headers, tls, timeouts, limits, pool, rate_limit, retry, idempotency, cache, "
            "circuit_breaker, failover, outbox, webhooks)",
        ),
        (
            MINIMAL + "retry:\n  attempts: 3\n  atempts: 4\n",
            "p.yaml:5: upstream api: retry.atempts: unknown field, did you mean 'attempts'? "
            "(allowed: attempts, backoff, on, retry_after, max_retry_after, budget)",
        ),
        (
            MINIMAL + "retry:\n  backoff:\n    foo: 1\n",
            "p.yaml:5: upstream api: retry.backoff.foo: unknown field (allowed: initial, max, multiplier, jitter)",
        ),
        ("upstream: api\n", "p.yaml:1: upstream api: target: required field missing"),
        (
            MINIMAL + "retry:\n  backoff: {initial: 0s}\n",
            "p.yaml:4: upstream api: retry.backoff.initial: must be more than 0 (e.g. 100ms, 30s)",
        ),
        (
            MINIMAL + "timeouts:\n  attempt: 5x\n",
            "p.yaml:4: upstream api: timeouts.attempt: bad duration '5x': use a number with a unit: "
            "ms, s, m, h, d (e.g. 250ms, 2s, 5m, 24h)",
        ),
        (
            MINIMAL + "timeouts:\n  attempt: 30\n",
            "p.yaml:4: upstream api: timeouts.attempt: bad duration 30: a number needs a unit: "
            "ms, s, m, h, d (e.g. 30s)",
        ),
        (
            MINIMAL + "timeouts:\n  attempt: 90s\n  total: 60s\n",
            "p.yaml:5: upstream api: timeouts.total: total (1m) must be at least attempt (90s)",
        ),
        (
            MINIMAL + "rate_limit:\n  rate: 0/s\n",
            "p.yaml:4: upstream api: rate_limit.rate: bad rate '0/s': rate must be positive",
        ),
        (MINIMAL + "rate_limit:\n  burst: 5\n", "p.yaml:3: upstream api: rate_limit.rate: required field missing"),
        (
            MINIMAL + "rate_limit:\n  rate: 10/s\n  queue: {max_size: 5}\n",
            "p.yaml:5: upstream api: rate_limit.queue.max_wait: required field missing",
        ),
        (
            MINIMAL + "retry:\n  on: [429, tiemout]\n",
            "p.yaml:4: upstream api: retry.on[1]: unknown condition 'tiemout': use a status code 400-599 "
            "or one of connect_error, timeout, reset",
        ),
        (
            MINIMAL + "retry:\n  on:\n    - 200\n",
            "p.yaml:5: upstream api: retry.on[0]: bad status code 200: use a status code 400-599 "
            "or one of connect_error, timeout, reset",
        ),
        (
            MINIMAL + "retry:\n  backoff: {jitter: ful}\n",
            "p.yaml:4: upstream api: retry.backoff.jitter: should be 'full', 'equal' or 'none'",
        ),
        (
            MINIMAL + "retry: [1, 2]\n",
            "p.yaml:3: upstream api: retry: should be a mapping (key: value), got a list",
        ),
        (
            MINIMAL + "cache: {ttl: 1m, methods: [POST]}\n",
            "p.yaml:3: upstream api: cache.methods[0]: should be 'GET' or 'HEAD'",
        ),
        (MINIMAL + "cache: {}\n", "p.yaml:3: upstream api: cache.ttl: required field missing"),
        (
            MINIMAL + "circuit_breaker:\n  failure_rate: 1.5\n",
            "p.yaml:4: upstream api: circuit_breaker.failure_rate: should be less than or equal to 1",
        ),
        (
            MINIMAL + "circuit_breaker:\n  open_for: 0\n",
            "p.yaml:4: upstream api: circuit_breaker.open_for: must be more than 0 (e.g. 100ms, 30s)",
        ),
        (
            MINIMAL + "auth: {}\n",
            "p.yaml:3: upstream api: auth: set exactly one of bearer, basic, header, "
            "oauth_client_credentials (none given)",
        ),
        (
            MINIMAL + "auth:\n  bearer: x\n  header: {name: X-Key, value: y}\n",
            "p.yaml:3: upstream api: auth: set exactly one of bearer, basic, header, "
            "oauth_client_credentials (got bearer, header)",
        ),
        (
            MINIMAL + "headers:\n  add: {'X Bad': v}\n",
            "p.yaml:4: upstream api: headers.add.X Bad: bad header name 'X Bad': "
            "use letters, digits and !#$%&'*+-.^_`|~ only",
        ),
        (
            MINIMAL + 'headers:\n  add: {X-Ok: "a\\r\\nInjected: 1"}\n',
            "p.yaml:4: upstream api: headers.add.X-Ok: a header value must not contain CR, LF or NUL",
        ),
        (
            "upstream: Stripe\ntarget: https://a.example\n",
            "p.yaml:1: upstream Stripe: upstream: bad upstream name 'Stripe': use lowercase letters, "
            "digits and '-', starting with a letter or digit, at most 63 characters",
        ),
        (
            "upstream: api\ntarget: api.example.com\n",
            "p.yaml:2: upstream api: target: bad target 'api.example.com': must be an absolute http:// or https:// URL",
        ),
        (
            "upstream: api\ntarget: https://api.example.com/?a=1\n",
            "p.yaml:2: upstream api: target: bad target 'https://api.example.com/?a=1': "
            "must not have a query (?) or fragment (#)",
        ),
        (
            "upstream: api\ntarget: https://user:pw@api.example.com\n",
            "p.yaml:2: upstream api: target: bad target: must not carry user:password@ (use auth: instead)",
        ),
        (
            MINIMAL + "listen: 127.0.0.1:99999\n",
            "p.yaml:3: upstream api: listen: bad listen '127.0.0.1:99999': port must be a number 0..65535",
        ),
        (
            MINIMAL + "listen: 8101\n",
            "p.yaml:3: upstream api: listen: listen must be a string HOST:PORT, e.g. 127.0.0.1:8101",
        ),
        (
            MINIMAL + "listen: [::1]:8101\n",
            "p.yaml:3: invalid YAML: while parsing a flow node, expected the node content, but found ':'; "
            'quote IPv6 addresses: listen: "[::1]:8101"',
        ),
        (
            MINIMAL + "failover:\n  - on: [exhausted]\n",
            "p.yaml:4: upstream api: failover[0].to: required field missing",
        ),
        (
            MINIMAL + "failover:\n  - to: api\n    on: [exhausted]\n",
            "p.yaml:4: upstream api: failover[0].to: an upstream cannot fail over to itself",
        ),
        (
            MINIMAL + "failover:\n  - to: ap\n    on: [exhausted]\n",
            "p.yaml:4: upstream api: failover[0].to: no upstream named 'ap', did you mean 'api'? (known: api)",
        ),
        (
            MINIMAL + "failover:\n  - to: b\n    on: [reset]\n---\nupstream: b\ntarget: https://b.example\n",
            "p.yaml:5: upstream api: failover[0].on[0]: unknown condition 'reset': use a status code 400-599 "
            "or one of circuit_open, exhausted, connect_error, timeout",
        ),
        (
            MINIMAL + "provider: {domain: x}\n",
            "p.yaml:3: upstream api: provider.name: required field missing",
        ),
        (
            "upstream: api\ntarget: https://a.example\ntarget: https://b.example\n",
            "p.yaml:3: upstream api: target: duplicate key (first given at line 2)",
        ),
        (
            "upstream: api\ntarget: [unclosed\n",
            "p.yaml:3: invalid YAML: while parsing a flow sequence, expected ',' or ']', but got '<stream end>'",
        ),
        (
            "- upstream: api\n",
            "p.yaml:1: a policy document should be a mapping (upstream: NAME, target: URL, ...), got a list",
        ),
        (
            "just text\n",
            "p.yaml:1: a policy document should be a mapping (upstream: NAME, target: URL, ...), got a string",
        ),
        ("target: https://a.example\n", "p.yaml:1: upstream: required field missing"),
        (
            MINIMAL + "tls: {verify: false}\n",
            "p.yaml:3: warning: upstream api: tls.verify: TLS certificate verification is off",
        ),
        (
            MINIMAL + "x: !!python/object:os.system {}\n",
            "p.yaml:3: upstream api: could not determine a "
            "constructor for the tag 'tag:yaml.org,2002:python/object:os.system'",
        ),
    ],
)
def test_problem_lines(tmp_path: Path, text: str, expected: str) -> None:
    f = write(tmp_path, "p.yaml", text)
    result = load(tmp_path)
    got = [str(p).replace(str(f), "p.yaml") for p in result.problems]
    if expected.startswith("p.yaml:3: upstream api: could not"):
        assert len(got) == 1 and got[0].startswith("p.yaml:3: upstream api: invalid YAML: ")
        assert "python/object" in got[0]
        return
    assert got == [expected]
    if "warning:" in expected:
        assert result.ok and result.policy_set is not None
    else:
        assert not result.ok and result.policy_set is None


def test_all_problems_are_collected(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """
        upstream: api
        target: https://a.example
        retry: {atempts: 3}
        timeouts: {attempt: 1}
        cache: {ttl: 0s}
        """,
    )
    write(tmp_path, "b.yaml", "upstream: b\n")
    result = load(tmp_path)
    assert [(Path(p.file).name, p.line, p.field) for p in result.problems] == [
        ("a.yaml", 3, "retry.atempts"),
        ("a.yaml", 4, "timeouts.attempt"),
        ("a.yaml", 5, "cache.ttl"),
        ("b.yaml", 1, "target"),
    ]


def test_directory_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert lines(load(missing)) == [f"{missing}: no such policy directory"]
    assert lines(load(tmp_path)) == [f"{tmp_path}: no policy files (*.yaml, *.yml) in this directory"]
    f = write(tmp_path, "a.yaml", MINIMAL)
    assert lines(load(f)) == [f"{f}: not a directory"]
    write(tmp_path, "a.yaml", "# nothing yet\n---\n")
    assert lines(load(tmp_path)) == [f"{tmp_path}: no upstreams defined (every policy file is empty)"]


def test_unreadable_and_binary_files(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"upstream: \xff\xfe\n")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "missing-target")
    write(tmp_path, "ok.yaml", MINIMAL)
    result = load(tmp_path)
    assert lines(result) == [f"{tmp_path / 'bin.yaml'}: not UTF-8 text (byte 10)"]


def test_problem_str_formats() -> None:
    assert str(Problem("a.yaml", 3, "stripe", "retry.backoff.initial", "bad")) == (
        "a.yaml:3: upstream stripe: retry.backoff.initial: bad"
    )
    assert str(Problem("a.yaml", None, "stripe", "failover[0].to", "bad")) == (
        "a.yaml: upstream stripe: failover[0].to: bad"
    )
    assert str(Problem("a.yaml", 7, None, None, "bad")) == "a.yaml:7: bad"
    assert str(Problem("a.yaml", 7, None, "x", "bad", "warning")) == "a.yaml:7: warning: x: bad"


# ---- cross-checks -----------------------------------------------------------------------


def test_duplicate_upstream_names_the_first(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL)
    write(tmp_path, "b.yaml", "# comment\n" + MINIMAL)
    assert lines(load(tmp_path)) == [
        f"{tmp_path / 'b.yaml'}:2: upstream api: upstream: duplicate upstream name "
        f"(first defined at {tmp_path / 'a.yaml'}:1)"
    ]


def test_duplicate_listen_ports(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """
        upstream: a
        target: https://a.example
        listen: 127.0.0.1:8101
        ---
        upstream: b
        target: https://b.example
        listen: 0.0.0.0:8101
        ---
        upstream: c
        target: https://c.example
        listen: 127.0.0.1:0
        ---
        upstream: d
        target: https://d.example
        listen: 127.0.0.1:0
        """,
    )
    assert lines(load(tmp_path)) == [
        f"{tmp_path / 'a.yaml'}:7: upstream b: listen: port 8101 is already used by upstream a "
        f"({tmp_path / 'a.yaml'}:3)"
    ]


def test_failover_to_an_invalid_but_present_upstream_is_not_reported_twice(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL + "failover: [{to: b, on: [exhausted]}]\n")
    write(tmp_path, "b.yaml", "upstream: b\ntarget: nope\n")
    assert [p.field for p in load(tmp_path).problems] == ["target"]


PAYPAL_B = "upstream: b\ntarget: https://b.example\nprovider: paypal\nauth: {bearer: x}\n"


def test_crosswalk_file(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", PAYPAL_B)
    write(tmp_path, "xw.data", "payment_methods:\n  pm_1: VAULT1\ntemplates: {d-1: welcome}\n")
    write(
        tmp_path,
        "a.yaml",
        MINIMAL + "failover:\n  - to: b\n    on: [exhausted]\n    crosswalk_file: xw.data\nprovider: stripe\n",
    )
    result = load(tmp_path)
    assert result.ok, lines(result)
    assert result.policy_set is not None
    entry = result.policy_set.by_name()["api"].failover[0]
    assert entry.crosswalk.payment_methods == {"pm_1": "VAULT1"}
    assert entry.crosswalk.templates == {"d-1": "welcome"}
    assert entry.crosswalk_file == "xw.data"
    version = result.policy_set.version
    write(tmp_path, "xw.data", "payment_methods:\n  pm_1: VAULT2\n")
    changed = load(tmp_path).policy_set
    assert changed is not None and changed.version != version


def test_crosswalk_file_problems(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", PAYPAL_B)
    write(
        tmp_path,
        "a.yaml",
        MINIMAL
        + "failover:\n"
        + "  - {to: b, on: [exhausted], crosswalk_file: missing.data}\n"
        + "  - {to: b, on: [exhausted], crosswalk_file: bad.data}\n"
        + "  - {to: b, on: [exhausted], crosswalk_file: bad.data, crosswalk: {}}\n"
        + "  - {to: b, on: [exhausted], crosswalk_file: list.data}\n"
        + "provider: stripe\n",
    )
    write(tmp_path, "bad.data", "payment_methods: {}\ntemplate: {}\n")
    write(tmp_path, "list.data", "- a\n")
    got = [str(p).replace(str(tmp_path) + "/", "") for p in load(tmp_path).problems]
    assert got == [
        "a.yaml:4: upstream api: failover[0].crosswalk_file: missing.data: cannot read file: No such file or directory",
        "a.yaml:6: upstream api: failover[2].crosswalk_file: give crosswalk or crosswalk_file, not both",
        "a.yaml:7: upstream api: failover[3].crosswalk_file: list.data: should hold one mapping "
        "(payment_methods:, templates:)",
        "bad.data:2: upstream api: failover[1].crosswalk.template: unknown field, did you mean 'templates'? "
        "(allowed: payment_methods, templates)",
    ]


# ---- secrets ----------------------------------------------------------------------------


SECRET = "sk_live_TOPSECRET_51H"


def test_secrets_from_env_and_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "key.txt"
    secret_file.write_text("file-secret-value\n")
    write(
        tmp_path,
        "a.yaml",
        f"""
        upstream: api
        target: https://api.example.com
        auth:
          header: {{name: X-Api-Key, value: "${{file:{secret_file}}}"}}
        headers:
          add:
            X-Plain: "cost $${{not.a.ref}} and $$5"
            X-Tenant: "tenant-${{env:TENANT}}"
        ---
        upstream: b
        target: https://b.example
        auth: {{bearer: "${{env:KEY}}"}}
        ---
        upstream: c
        target: https://c.example
        auth: {{header: {{name: X-Key, value: "${{file:key.txt}}"}}}}
        """,
    )
    result = load(tmp_path, environ={"KEY": SECRET, "TENANT": "t1"})
    assert result.ok, lines(result)
    assert result.policy_set is not None
    by_name = result.policy_set.by_name()
    a = by_name["api"]
    assert a.auth is not None and a.auth.header is not None
    assert a.auth.header.value.get_secret_value() == "file-secret-value"
    assert a.headers.add == {"X-Plain": "cost ${not.a.ref} and $$5", "X-Tenant": "tenant-t1"}
    b = by_name["b"]
    assert b.auth is not None and b.auth.bearer is not None and b.auth.bearer.get_secret_value() == SECRET
    c = by_name["c"]
    assert c.auth is not None and c.auth.header is not None
    assert c.auth.header.value.get_secret_value() == "file-secret-value"
    for policy in result.policy_set.policies:
        assert SECRET not in str(policy) and SECRET not in repr(policy)
        assert "file-secret-value" not in repr(policy)
    assert "tenant-t1" not in repr(a)  # header values may hold secrets: shown masked


def test_unset_env_is_error_strict_warning_lenient(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", MINIMAL + "auth:\n  bearer: Bearer ${env:API_KEY}\n")
    strict = load(tmp_path)
    assert lines(strict) == [f"{f}:4: upstream api: auth.bearer: environment variable API_KEY is not set"]
    assert not strict.ok and strict.policy_set is None
    lenient = load(tmp_path, secrets="lenient")
    assert lines(lenient) == [
        f"{f}:4: warning: upstream api: auth.bearer: environment variable API_KEY is not set (an error for egressd run)"
    ]
    assert lenient.ok and lenient.policy_set is not None


def test_unset_secret_in_a_field_that_must_not_be_empty_is_reported_once(tmp_path: Path) -> None:
    """An OAuth client_id from an unset variable: one line naming the variable (an error
    for run, a warning for check), not a second one about the empty value left behind."""
    f = write(
        tmp_path,
        "a.yaml",
        MINIMAL
        + "auth:\n  oauth_client_credentials:\n    token_url: https://api.example.com/token\n"
        + "    client_id: ${env:CID}\n    client_secret: ${env:CSECRET}\n",
    )
    strict = load(tmp_path)
    assert lines(strict) == [
        f"{f}:6: upstream api: auth.oauth_client_credentials.client_id: environment variable CID is not set",
        f"{f}:7: upstream api: auth.oauth_client_credentials.client_secret: environment variable CSECRET is not set",
    ]
    assert strict.policy_set is None
    lenient = load(tmp_path, secrets="lenient")
    assert [p.severity for p in lenient.problems] == ["warning", "warning"]
    assert lenient.ok and lenient.policy_set is not None


def test_unreadable_secret_file_and_bad_references(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "a.yaml",
        MINIMAL
        + "auth:\n  bearer: ${file:/nonexistent/egressd/key}\n"
        + "headers:\n  add: {X-A: '${vault:x}', X-B: '${env:A'}\n",
    )
    assert [s.replace(str(f), "a.yaml") for s in lines(load(tmp_path))] == [
        "a.yaml:4: upstream api: auth.bearer: cannot read secret file /nonexistent/egressd/key: "
        "No such file or directory",
        "a.yaml:6: upstream api: headers.add.X-A: bad secret reference '${vault:x}': use ${env:NAME} or "
        "${file:/path} (write '$${' for a literal '${')",
        "a.yaml:6: upstream api: headers.add.X-B: unterminated '${' (write '$${' for a literal '${')",
    ]
    lenient = load(tmp_path, secrets="lenient")
    assert [p.severity for p in lenient.problems] == ["warning", "error", "error"]


def test_secret_values_never_appear_in_problems(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """
        upstream: ${env:KEY}
        target: https://${env:KEY}/x?${env:KEY}
        auth:
          bearer: "${env:KEY}"
          basic: {username: "${env:KEY}:x", password: "${env:KEY}"}
        headers: {add: {X-A: "${env:NL}"}}
        """,
    )
    result = load(tmp_path, environ={"KEY": SECRET, "NL": f"{SECRET}\r\nX: 1"})
    assert result.problems
    for problem in result.problems:
        assert SECRET not in str(problem) and SECRET not in repr(problem)


def test_secret_not_in_validation_error_text() -> None:
    with pytest.raises(ValidationError) as info:
        Policy.model_validate({"upstream": "a", "target": "https://a", "auth": {"bearer": SECRET + "\n"}})
    assert SECRET not in str(info.value)


# ---- the typed model --------------------------------------------------------------------


def test_models_are_frozen_and_forbid_extras() -> None:
    policy = Policy(upstream="a", target="https://a.example")
    with pytest.raises(ValidationError):
        policy.upstream = "b"
    with pytest.raises(ValidationError):
        Policy.model_validate({"upstream": "a", "target": "https://a.example", "nope": 1})


def test_python_callers_may_give_plain_seconds() -> None:
    assert Timeouts(attempt=0.5).attempt == 0.5
    with pytest.raises(ValidationError):
        Timeouts.model_validate({"attempt": 5}, context={"source": "yaml"})


def test_fingerprint(tmp_path: Path) -> None:
    base = {"upstream": "a", "target": "https://a.example", "retry": {"attempts": 3}}
    p1 = Policy.model_validate(base)
    p2 = Policy.model_validate({**base, "cache": {"ttl": "1m"}})
    assert len(p1.fingerprint()) == 64
    assert p1.fingerprint() == Policy.model_validate(base).fingerprint()
    assert p1.fingerprint("retry") == p2.fingerprint("retry")
    assert p1.fingerprint("retry", "target") == p2.fingerprint("retry", "target")
    assert p1.fingerprint() != p2.fingerprint()
    assert p1.fingerprint("cache") != p2.fingerprint("cache")
    s1 = Policy.model_validate({**base, "auth": {"bearer": "k1"}})
    s2 = Policy.model_validate({**base, "auth": {"bearer": "k2"}})
    assert s1.fingerprint("auth") != s2.fingerprint("auth")
    assert "k1" not in s1.fingerprint("auth")
    with pytest.raises(ValueError, match="no policy section"):
        p1.fingerprint("retries")


def test_provider_forms() -> None:
    short = Policy.model_validate({"upstream": "a", "target": "https://a", "provider": "stripe"})
    assert short.provider.name == "stripe" and short.provider.settings == {}
    long = Policy.model_validate(
        {"upstream": "a", "target": "https://a", "provider": {"name": "mailgun", "domain": "mg.example.com"}}
    )
    assert long.provider.settings == {"domain": "mg.example.com"}
    again = Policy.model_validate(long.model_dump())
    assert again.provider == long.provider


def test_json_schema() -> None:
    schema = policy_json_schema()
    json.dumps(schema)
    assert set(schema["required"]) == {"upstream", "target"}
    assert schema["additionalProperties"] is False
    timeouts = schema["$defs"]["Timeouts"]["properties"]
    assert timeouts["attempt"]["default"] == "30s"
    assert any(alt.get("type") == "string" and "pattern" in alt for alt in timeouts["attempt"]["anyOf"])
    rate = schema["$defs"]["RateLimit"]["properties"]["rate"]
    assert rate["type"] == "string" and "pattern" in rate


def test_on_key_is_not_a_boolean(tmp_path: Path) -> None:
    # YAML 1.1 reads `on`/`yes`/`no` as booleans; policies use YAML 1.2 scalars.
    write(tmp_path, "a.yaml", MINIMAL + "retry: {on: [503]}\nprovider: {name: x, flag: yes, date: 2024-01-01}\n")
    result = load(tmp_path)
    assert result.policy_set is not None, lines(result)
    policy = result.policy_set.policies[0]
    assert policy.retry is not None and policy.retry.on == [503]
    assert policy.provider.settings == {"flag": "yes", "date": "2024-01-01"}


def test_alias_bomb_is_a_problem_not_a_hang(tmp_path: Path) -> None:
    bomb = ["upstream: api", "target: https://a.example", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for n in range(1, 9):
        refs = ", ".join([f"*a{n - 1}"] * 10)
        bomb.append(f"a{n}: &a{n} [{refs}]")
    write(tmp_path, "a.yaml", "\n".join(bomb) + "\n")
    result = load(tmp_path)
    assert [p.message for p in result.problems] == [
        "document too large: more than 100000 values (after expanding aliases)"
    ]


# ---- robustness: nothing ever raises ----------------------------------------------------

_yamlish = st.text(
    alphabet=st.sampled_from(list("abcdeupstrgmlnio:-[]{},'\"#&*!|>%@`?\n \t0123456789.$/\\")),
    max_size=200,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_yamlish, st.text(max_size=200)))
def test_arbitrary_text_never_raises(tmp_path: Path, text: str) -> None:
    (tmp_path / "fuzz.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    result = load_policy_dir(tmp_path, environ={})
    assert isinstance(result, LoadResult)
    for problem in result.problems:
        assert "\n" not in str(problem) and "internal error" not in str(problem)


_keys = st.one_of(
    st.sampled_from(
        [
            "upstream",
            "target",
            "provider",
            "listen",
            "auth",
            "retry",
            "rate_limit",
            "on",
            "to",
            "failover",
            "cache",
            "ttl",
            "bearer",
            "basic",
            "queue",
            "crosswalk_file",
            "crosswalk",
            "backoff",
            "timeouts",
            "attempt",
            "headers",
            "add",
            "remove",
            "name",
        ]
    ),
    st.text(max_size=8),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["5s", "100/s", "10MiB", "https://a.example", "api", "${env:X}", "$${", "[::1]:1"]),
)
_trees = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(_keys, _trees, max_size=8))
def test_arbitrary_documents_never_raise(tmp_path: Path, doc: dict[str, Any]) -> None:
    (tmp_path / "fuzz.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = load_policy_dir(tmp_path, secrets="lenient", environ={})
    assert isinstance(result, LoadResult)
    assert result.ok == (result.policy_set is not None)
    for problem in result.problems:
        assert "internal error" not in str(problem) and "\n" not in str(problem)


@pytest.mark.parametrize("domain", ["../../x", "mg.example.com/evil", "a?b", "a#b", "", "-bad.example.com"])
def test_mailgun_domain_must_be_a_host_name(tmp_path: Path, domain: str) -> None:
    import json as _json

    (tmp_path / "m.yaml").write_text(
        "upstream: mailgun\ntarget: https://api.mailgun.net\n"
        f"provider: {{name: mailgun, domain: {_json.dumps(domain)}}}\n"
    )
    result = load_policy_dir(tmp_path)
    assert not result.ok
    assert any("not a host name" in str(p) for p in result.problems), [str(p) for p in result.problems]


def test_mailgun_domain_accepts_a_host_name(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "upstream: mailgun\ntarget: https://api.mailgun.net\nprovider: {name: mailgun, domain: mg.example.com}\n"
    )
    assert load_policy_dir(tmp_path).ok
