"""The campaign's short form (bench/campaign.py, 60 s): load with random faults from the
matrix, and the accounting that must hold at the end. The 10-minute run is for the record
(docs/reliability.md); this one runs in CI, in the default test run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CAMPAIGN = Path(__file__).resolve().parent.parent / "bench" / "campaign.py"


def load_campaign() -> ModuleType:
    spec = importlib.util.spec_from_file_location("egressd_campaign", CAMPAIGN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.soak
@pytest.mark.timeout(180)
async def test_soak_60s_with_random_faults(tmp_path: Path) -> None:
    campaign = load_campaign()
    fig: dict[str, Any] = await campaign.run_campaign(
        seconds=float(os.environ.get("SOAK_SECONDS", "60")),
        concurrency=8,
        rate=100,
        fault_interval=1.0,
        sample_interval=5.0,
        quiet=True,
        workdir=tmp_path,
    )
    report = campaign.render(fig)
    print(report)
    assert fig["requests"] > 1000, report  # about 100 calls/s on an idle machine; CI machines are shared
    assert fig["faults_total"] >= 30, report
    # Exactly one answer per request.
    assert fig["lost"] == 0 and fig["answered"] + fig["aborted_streams"] == fig["requests"], report
    assert fig["short_200"] == 0, report
    # Exactly-once side effects.
    assert fig["payment_duplicates"] == 0 and fig["payment_phantoms"] == 0, report
    assert fig["email_duplicates"] == 0 and fig["email_phantoms"] == 0, report
    # Hostile requests: all answered, none forwarded.
    assert fig["hostile_forwarded"] == 0 and fig["hostile_answered"] == fig["hostile_sent"] > 50, report
    # No leak: FDs back to their post-warm-up level; upstream connections bounded by the pools.
    # Connections that bounded pools keep are not leaks: `fd_leak` compares FDs without idle
    # pooled upstream connections (two FDs each: egressd's end and the fake's), egressd's
    # Redis connections (32, dropped and reopened by every Redis fault) and the app's
    # connections to egressd. Upstream connections still busy once every answer is in would
    # be leaks (an answer never released): there must be none.
    assert fig["fd_leak"] <= 10, report
    assert fig["pool_busy_final"] == 0, report
    assert max(s["upstream_conns"] for s in fig["samples"]) <= 3 * 8 + 10, report
    assert fig["ok"], report
