"""Finds provider plugins through the `egressd.plugins` entry-point group."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from plugins.base import GenericPlugin, ProviderPlugin

GROUP = "egressd.plugins"


@cache
def _builtin() -> dict[str, type[ProviderPlugin]]:
    from plugins.mailgun import MailgunPlugin
    from plugins.paypal import PayPalPlugin
    from plugins.sendgrid import SendGridPlugin
    from plugins.stripe import StripePlugin

    return {p.name: p for p in (GenericPlugin, StripePlugin, PayPalPlugin, SendGridPlugin, MailgunPlugin)}


@cache
def available() -> dict[str, type[ProviderPlugin]]:
    """Every plugin class by name: the built-ins, then whatever entry points add."""
    found = dict(_builtin())
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            continue
        loaded = ep.load()
        if isinstance(loaded, type) and issubclass(loaded, ProviderPlugin):
            found[ep.name] = loaded
    return found


def load_plugin(name: str, settings: Mapping[str, Any] | None = None) -> ProviderPlugin:
    try:
        cls = available()[name]
    except KeyError:
        raise LookupError(f"unknown provider plugin {name!r} (known: {', '.join(sorted(available()))})") from None
    return cls(settings)
