"""The one rule for a test that needs something this machine may lack (a binary, a tool
from the test extra): skip it locally, fail it in CI, where `.ci/run` installs everything
and a skip would hide a missing install step."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

#: CI runs `.ci/run` with CI=true (any non-empty value but "false"/"0" counts).
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def missing(message: str) -> NoReturn:
    """Skip the test (locally) or fail it (in CI) because `message` names what is missing."""
    if IN_CI:
        pytest.fail(f"CI must have this (install it in .ci/run): {message}", pytrace=False)
    pytest.skip(message)
