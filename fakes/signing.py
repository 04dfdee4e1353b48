"""How each fake provider signs one webhook POST, as data and a function (``sign(spec,
payload)``), so that the fake itself or a courier process (fakes/courier.py) can sign it.

A spec is a small mapping of strings: ``{"scheme": "stripe", "secret": "whsec_..."}``,
``{"scheme": "paypal", "webhook_id": "WH-...", "key": <PEM RSA private key>}``,
``{"scheme": "sendgrid", "key": <PEM P-256 private key>}``, ``{"scheme": "mailgun", "key":
<signing key>}``. ``payload`` is the event as the provider serialised it; the result is the
POST's body and headers, signed now (a fresh timestamp, transmission or token every call).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import time
import uuid
import zlib
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

__all__ = [
    "PAYPAL_CERT_URL",
    "SignSpec",
    "iso_now",
    "mailgun_signature",
    "paypal_message",
    "pem",
    "sign",
    "stripe_signature",
]

SignSpec = Mapping[str, str]
PAYPAL_CERT_URL = "https://api.sandbox.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-a5cafa77"


def iso_now(millis: bool = False) -> str:
    """PayPal's time stamps: ``2026-11-27T10:00:00Z`` (``.000Z`` with millis)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return stamp + (f".{int(now % 1 * 1000):03d}Z" if millis else "Z")


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    """A private key as PKCS#8 PEM (what a spec carries)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@functools.lru_cache(maxsize=64)
def _key(text: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(text.encode(), None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("a webhook signing key must be RSA (PayPal) or EC P-256 (SendGrid)")
    return key


def stripe_signature(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` value for ``body`` (providers.md 1.11)."""
    t = int(time.time()) if timestamp is None else timestamp
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={sig}"


def paypal_message(transmission_id: str, when: str, webhook_id: str, body: bytes) -> bytes:
    """What PayPal signs (providers.md 2.10): ``transmission_id|time|webhook_id|crc32(body)``."""
    return f"{transmission_id}|{when}|{webhook_id}|{zlib.crc32(body)}".encode()


def mailgun_signature(signing_key: str, timestamp: str | None = None) -> dict[str, str]:
    """A webhook ``signature`` object (providers.md 5.5): a fresh token, now or at ``timestamp``."""
    stamp = str(int(time.time())) if timestamp is None else timestamp
    token = secrets.token_hex(25)
    sig = hmac.new(signing_key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": stamp, "token": token, "signature": sig}


def sign(spec: SignSpec, payload: bytes) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one POST of ``payload``, signed now with ``spec``'s scheme."""
    scheme = spec.get("scheme")
    if scheme == "stripe":
        return payload, {
            "Stripe-Signature": stripe_signature(payload, spec["secret"]),
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
    if scheme == "paypal":
        key = _key(spec["key"])
        assert isinstance(key, rsa.RSAPrivateKey)
        transmission_id, when = str(uuid.uuid1()), iso_now()
        message = paypal_message(transmission_id, when, spec["webhook_id"], payload)
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return payload, {
            "Content-Type": "application/json",
            "User-Agent": "PayPal/AUHD-214.0-58191457",
            "PAYPAL-AUTH-ALGO": "SHA256withRSA",
            "PAYPAL-AUTH-VERSION": "v2",
            "PAYPAL-CERT-URL": PAYPAL_CERT_URL,
            "PAYPAL-TRANSMISSION-ID": transmission_id,
            "PAYPAL-TRANSMISSION-TIME": when,
            "PAYPAL-TRANSMISSION-SIG": base64.b64encode(signature).decode(),
        }
    if scheme == "sendgrid":
        key = _key(spec["key"])
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        stamp = str(int(time.time()))
        signature = key.sign(stamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
        return payload, {
            "Content-Type": "application/json",
            "User-Agent": "SendGrid Event API",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }
    if scheme == "mailgun":
        # The signature is in the body, beside `event-data` (kept byte for byte).
        signature_object = json.dumps(mailgun_signature(spec["key"])).encode()
        body = b'{"signature": ' + signature_object + b', "event-data": ' + payload + b"}"
        return body, {"Content-Type": "application/json", "User-Agent": "mailgun/treq-16.12.0"}
    raise ValueError(f"unknown webhook signing scheme {scheme!r}")
