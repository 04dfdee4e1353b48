"""Policy configuration: the typed schema, YAML loading with line numbers, secrets, units.

result = load_policy_dir("policies")
if not result.ok:
    for problem in result.problems:
        print(problem)          # FILE:LINE: upstream NAME: FIELD: what is wrong
policies = result.policy_set.by_name()
"""

from proxy.config.loader import LoadResult, PolicySet, Problem, load_policy_dir, policy_json_schema
from proxy.config.schema import (
    Auth,
    Backoff,
    BasicAuth,
    Cache,
    CircuitBreaker,
    Crosswalk,
    Failover,
    HeaderAuth,
    HeadersPolicy,
    Idempotency,
    Limits,
    OAuthClientCredentials,
    Policy,
    ProviderRef,
    Queue,
    RateLimit,
    Retry,
    RetryBudget,
    Timeouts,
    Tls,
)
from proxy.config.units import Rate, format_duration, format_size, parse_duration, parse_rate, parse_size

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
    "LoadResult",
    "OAuthClientCredentials",
    "Policy",
    "PolicySet",
    "Problem",
    "ProviderRef",
    "Queue",
    "Rate",
    "RateLimit",
    "Retry",
    "RetryBudget",
    "Timeouts",
    "Tls",
    "format_duration",
    "format_size",
    "load_policy_dir",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "policy_json_schema",
]
