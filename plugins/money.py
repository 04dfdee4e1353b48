"""Amounts between Stripe (integer minor units) and PayPal (decimal strings), providers.md 3.

Integer and `Decimal` arithmetic only, never binary floating point.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from plugins.base import Refused

STRIPE_ZERO_DECIMAL = frozenset("BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF".split())
STRIPE_THREE_DECIMAL = frozenset("BHD JOD KWD OMR TND".split())
# PayPal REST payment currencies and their decimals (providers.md 3.2). BRL, CNY, MYR and
# INR are in-country only and RUB's status is unverified: left out (conservative).
PAYPAL_DECIMALS: dict[str, int] = {
    **{c: 2 for c in "AUD CAD CZK DKK EUR HKD ILS MXN NZD NOK PHP PLN GBP SGD SEK CHF THB USD".split()},
    "HUF": 0,
    "JPY": 0,
    "TWD": 0,
}
STRIPE_MAX_AMOUNT = 99_999_999
PAYPAL_MAX = Decimal("999999999999999.99")
_VALUE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?$")
# What a refusal names (callers rename them into their own fields with `Refused.renamed`).
AMT = ("amount",)
CUR = ("currency",)


def stripe_exponent(code: str) -> int:
    code = code.upper()
    if code in STRIPE_ZERO_DECIMAL:
        return 0
    if code in STRIPE_THREE_DECIMAL:
        return 3
    return 2


def stripe_minimum(code: str) -> int:
    """Stripe's minimum charge in minor units (about USD 0.50; 1 unit where unknown)."""
    return {"USD": 50, "EUR": 50, "GBP": 30, "CAD": 50, "AUD": 50, "CHF": 50, "JPY": 50, "HUF": 17500}.get(
        code.upper(), 1
    )


def stripe_to_paypal(amount: int, currency: str) -> tuple[str, str]:
    """(1099, "usd") -> ("USD", "10.99"); raises Refused when PayPal cannot express it."""
    code = currency.upper()
    if code in STRIPE_THREE_DECIMAL:
        raise Refused("unsupported_currency", f"{code} is a three-decimal currency; PayPal has none", names=CUR)
    if code not in PAYPAL_DECIMALS:
        raise Refused("unsupported_currency", f"PayPal does not process {code}", names=CUR)
    if amount <= 0:
        raise Refused("amount_not_representable", "amount must be positive", names=AMT)
    major = Decimal(amount).scaleb(-stripe_exponent(code))
    q = major.quantize(Decimal(1).scaleb(-PAYPAL_DECIMALS[code]))
    if q != major:
        raise Refused(
            "amount_not_representable",
            f"{amount} {code} minor units cannot be expressed with {PAYPAL_DECIMALS[code]} decimals at PayPal",
            names=AMT,
        )
    if q > PAYPAL_MAX:
        raise Refused("amount_not_representable", "amount is over PayPal's maximum", names=AMT)
    return code, format(q, "f")


def paypal_to_stripe(value: str, currency_code: str) -> tuple[int, str]:
    """("10.99", "USD") -> (1099, "usd"); raises Refused when Stripe cannot express it."""
    code = currency_code.upper()
    if code not in PAYPAL_DECIMALS:
        raise Refused("unsupported_currency", f"{code} is not a currency both providers process", names=CUR)
    if not isinstance(value, str) or not _VALUE_RE.match(value):
        raise Refused("amount_not_representable", f"amount {value!r} is not a positive decimal", names=AMT)
    try:
        d = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex guards
        raise Refused("amount_not_representable", str(exc), names=AMT) from exc
    exponent = d.as_tuple().exponent
    places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    if places > PAYPAL_DECIMALS[code]:
        raise Refused("amount_not_representable", f"{value} {code} has too many decimals", names=AMT)
    minor = d.scaleb(stripe_exponent(code))
    if minor != minor.to_integral_value():
        raise Refused("amount_not_representable", f"{value} {code} is not a whole number of minor units", names=AMT)
    n = int(minor)
    if n <= 0 or n > STRIPE_MAX_AMOUNT:
        raise Refused("amount_not_representable", f"{value} {code} is outside Stripe's amount range", names=AMT)
    if n < stripe_minimum(code):
        raise Refused("amount_not_representable", f"{value} {code} is under Stripe's minimum charge", names=AMT)
    return n, code.lower()


def minor_from_paypal(value: str, currency_code: str) -> int:
    """A PayPal answer's amount in Stripe minor units (no refusal: for building replies)."""
    try:
        return int(Decimal(value).scaleb(stripe_exponent(currency_code)))
    except (InvalidOperation, ValueError):
        return 0


def paypal_value(minor: int, currency: str) -> str:
    """Stripe minor units as a PayPal value string (for replies; no refusal)."""
    code = currency.upper()
    major = Decimal(int(minor)).scaleb(-stripe_exponent(code))
    places = PAYPAL_DECIMALS.get(code, 2)
    return format(major.quantize(Decimal(1).scaleb(-places)), "f")
