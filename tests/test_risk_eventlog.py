"""Risk limits, the kill switch (file and SIGTERM) and the event log of a trading run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from moondev_lab.eventlog import EventLog
from moondev_lab.exchange import ClientOrderId, Order, OrderState
from moondev_lab.exchange._scrub import register_secret
from moondev_lab.risk import KillSwitch, RiskBreach, RiskGuard, RiskLimits

pytestmark = pytest.mark.timeout(60)


def test_order_value_and_position_limits_long_and_short():
    guard = RiskGuard(RiskLimits(max_position=1.0, max_order_value=50_000))
    guard.check("buy", 1.0, 40_000, position=0.0)
    guard.check("sell", 2.0, 20_000, position=1.0)          # flips to -1: allowed
    with pytest.raises(RiskBreach, match="order value 60000.00 > max_order_value 50000"):
        guard.check("buy", 1.5, 40_000, position=0.0)
    with pytest.raises(RiskBreach, match="position would be -1.5 > max_position 1"):
        guard.check("sell", 1.0, 40_000, position=-0.5)
    RiskGuard(RiskLimits()).check("buy", 1e6, 1e6, position=1e6)  # no limits, nothing refused


def test_daily_loss_engages_the_kill_switch_and_stops_every_order():
    guard = RiskGuard(RiskLimits(max_daily_loss=500))
    guard.update_equity(10_000, "2024-01-01 00:00")
    guard.update_equity(9_600, "2024-01-01 12:00")          # -400: fine
    guard.check("buy", 0.01, 40_000, position=0)
    guard.update_equity(10_100, "2024-01-02 00:00")         # a new day starts from its first reading
    guard.update_equity(9_550, "2024-01-02 09:00")          # -550 today
    with pytest.raises(RiskBreach, match="kill switch engaged: daily loss 550.00 > max_daily_loss 500 on 2024-01-02"):
        guard.check("sell", 0.01, 40_000, position=0)


def test_kill_file_and_sigterm(tmp_path):
    ks = KillSwitch(tmp_path / "KILL")
    assert ks.engaged is None
    (tmp_path / "KILL").touch()
    assert "kill file" in ks.engaged and "kill file" in repr(ks)

    before = signal.getsignal(signal.SIGTERM)
    with KillSwitch() as ks2:
        os.kill(os.getpid(), signal.SIGTERM)
        guard = RiskGuard(RiskLimits(), ks2)
        with pytest.raises(RiskBreach, match="SIGTERM received"):
            guard.check("buy", 1, 1, position=0)
    assert signal.getsignal(signal.SIGTERM) is before       # the previous handler is back


def test_event_log_reads_as_a_dataframe_and_hides_keys(tmp_path):
    register_secret("sk-live-Secret123")
    log = EventLog(tmp_path / "run" / "events.sqlite")
    assert not (tmp_path / "run").exists() and log.frame().empty  # no I/O until the first event
    order = Order(ClientOrderId.make("sma", "2024-01-01", 0), "17", "BTC/USDT", "buy", "limit", 0.01, 40000.0,
                  status=OrderState.ACCEPTED)
    log.append("decision", bar=pd.Timestamp("2024-01-01", tz="UTC"), action="buy", size=0.5)
    log.append("order", order=order, note="key sk-live-Secret123 must not show")
    log.append("fill", client_order_id=order.client_order_id, price=40000.0, amount=0.01)
    df = log.frame()
    assert list(df["kind"]) == ["decision", "order", "fill"] and len(log) == 3
    assert df.loc[1, "order.status"] == "accepted" and df.loc[2, "price"] == 40000.0
    assert df.loc[0, "bar"] == "2024-01-01T00:00:00+00:00" and str(df["time"].dtype).startswith("datetime64")
    assert "sk-live-Secret123" not in df.to_string() and "***" in df.loc[1, "note"]
    assert list(log.frame("fill")["amount"]) == [0.01]
    log.close()


def test_event_log_survives_kill_9(tmp_path):
    path = tmp_path / "events.sqlite"
    code = textwrap.dedent(f"""
        import os, signal
        from moondev_lab.eventlog import EventLog
        log = EventLog({str(path)!r})
        for i in range(50):
            log.append("tick", i=i)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list(EventLog(path).frame()["i"]) == list(range(50))
