"""Realistic fake provider servers (Stripe, PayPal, SendGrid, Mailgun, and a generic echo
upstream) with fault injection and a side-effect ledger.

Used by egressd's own tests, ``egressd demo`` and the benchmarks, and meant for users'
tests too::

    from fakes import FakeServer

    async with FakeServer("stripe") as stripe:
        stripe.faults.status(503, count=2, path="/v1/payment_intents")
        ...  # point the app (or egressd) at stripe.url
        assert stripe.ledger.count("payment_intent.created") == 1

See docs/fakes.md.
"""

from .echo import make_echo_app, pattern_bytes
from .faults import Fault, FaultError, FaultHit, Faults
from .mailgun import make_mailgun_app
from .paypal import make_paypal_app
from .sendgrid import make_sendgrid_app
from .server import (
    FAKE_NAMES,
    FakeServer,
    Ledger,
    RecordedRequest,
    SideEffect,
    make_app,
    reset_fake,
    running_fakes,
    start_fakes,
    stop_fakes,
)
from .stripe import make_stripe_app, parse_stripe_form

__all__ = [
    "FAKE_NAMES",
    "FakeServer",
    "Fault",
    "FaultError",
    "FaultHit",
    "Faults",
    "Ledger",
    "RecordedRequest",
    "SideEffect",
    "make_app",
    "make_echo_app",
    "make_mailgun_app",
    "make_paypal_app",
    "make_sendgrid_app",
    "make_stripe_app",
    "parse_stripe_form",
    "pattern_bytes",
    "reset_fake",
    "running_fakes",
    "start_fakes",
    "stop_fakes",
]
