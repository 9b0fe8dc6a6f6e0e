"""`moondev-lab data ...` end to end, in-process and as a real console script."""
from __future__ import annotations

import json
import subprocess
import sys


from conftest import BTC_CSV, REPO
from fake_exchange import FakeBinance
from moondev_lab.cli import main


def run_json(capsys, *argv) -> tuple[int, object]:
    rc = main([*argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_import_ls_info(capsys):
    rc, out = run_json(capsys, "data", "import", str(BTC_CSV), "--symbol", "BTC/USD", "--timeframe", "15m")
    assert rc == 0 and out["mode"] == "create" and out["series"]["rows"] == 31066
    assert out["report"]["gaps"] == 2
    rc, out = run_json(capsys, "data", "ls")
    assert rc == 0 and [(s["symbol"], s["timeframe"], s["rows"]) for s in out] == [("BTC/USD", "15m", 31066)]
    rc, out = run_json(capsys, "data", "info", "BTC/USD", "15m", "--verify")
    assert rc == 0 and out["verified"] and out["file"].endswith(".arrow")
    assert main(["data", "ls"]) == 0 and "BTC/USD" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("datetime,open,high,low,close,volume\n2023-01-01 00:00,1,2,0.5,1.5,1\n2023-01-01 00:15,1,0.1,0.5,1.5,1\n")
    assert main(["data", "import", str(bad), "--symbol", "X/USD", "--timeframe", "15m"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv line 3" in err and "High 0.1 < Low 0.5" in err
    rc, out = run_json(capsys, "data", "import", str(bad), "--symbol", "X/USD", "--timeframe", "15m", "--repair")
    assert rc == 0 and out["rows_added"] == 2 and "fixed High 0.1" in out["report"]["issues"][0]
    rc, out = run_json(capsys, "data", "info", "NOPE/USD", "1h")
    assert rc == 2 and out["error"] == "SeriesNotFound"


def test_fetch_through_the_cli():
    with FakeBinance() as fake:
        cmd = [sys.executable, "-m", "moondev_lab.cli", "data", "fetch", "--exchange", "binance",
               "--symbol", "BTC/USDT", "--timeframe", "1h", "--since", "2024-01-01", "--limit", "200",
               "--api-url", fake.url, "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["candles"] == 500 and res["pages"] == 3
        ls = subprocess.run([sys.executable, "-m", "moondev_lab.cli", "data", "ls"], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
        assert "BTC/USDT" in ls.stdout and "binance" in ls.stdout
