"""`data import` / `data export` for the formats peers use, detected from content; nothing hangs or blows up."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from moondev_lab.cli import main
from moondev_lab.data import Store
from moondev_lab.data.formats import UnknownFormatError, detect
from moondev_lab.data.ingest import MAX_COLUMNS, MAX_LINE_BYTES, read_file
from moondev_lab.data.validate import DataValidationError

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def candles(n: int = 300, freq: str = "5min", seed: int = 0) -> pd.DataFrame:
    """freqtrade's in-memory layout: date (tz-aware UTC) + lower-case OHLCV."""
    c = 100 + np.cumsum(np.random.default_rng(seed).normal(0, 0.2, n))
    return pd.DataFrame({"date": pd.date_range(T0, periods=n, freq=freq), "open": c, "high": c + 0.5,
                         "low": c - 0.5, "close": c + 0.1, "volume": np.arange(1, n + 1, dtype=float)})


def ccxt_list(df: pd.DataFrame) -> list:
    ms = df["date"].dt.as_unit("ms").astype("int64").tolist()
    return [[m, *row] for m, row in zip(ms, df[["open", "high", "low", "close", "volume"]].to_numpy().tolist())]


def assert_same(stored: pd.DataFrame, df: pd.DataFrame) -> None:
    assert list(stored.index) == list(df["date"])
    for c in ["open", "high", "low", "close", "volume"]:
        assert np.array_equal(stored[c.title()].to_numpy(), df[c].to_numpy()), c


def run_json(capsys, *argv) -> tuple[int, object]:
    rc = main([*argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def cli(*argv, timeout=120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


# ----- freqtrade and ccxt layouts -----------------------------------------------------------
def freqtrade_dir(root):
    """A freqtrade user_data/data/binance folder in each format freqtrade writes."""
    d = root / "binance"
    (d / "futures").mkdir(parents=True)
    df = candles()
    df.to_feather(d / "XRP_ETH-5m.feather", compression="lz4")  # freqtrade's own writer call
    df.to_parquet(d / "BTC_USDT-5m.parquet", index=False)
    (d / "ETH_BTC-5m.json").write_text(json.dumps(ccxt_list(df)))
    with gzip.open(d / "LTC_BTC-5m.json.gz", "wt") as f:
        json.dump(ccxt_list(df), f)
    df.to_feather(d / "futures" / "BTC_USDT_USDT-5m-futures.feather")
    df.to_feather(d / "futures" / "BTC_USDT_USDT-8h-funding_rate.feather")
    (d / "README.txt").write_text("not data")
    return d, df


def test_freqtrade_data_dir_imports_with_symbols_and_timeframes_from_names(tmp_path, capsys):
    d, df = freqtrade_dir(tmp_path)
    rc, table = run_json(capsys, "data", "import", str(d))
    assert rc == 0
    got = {r["file"]: r for r in table}
    expect = {"XRP_ETH-5m.feather": ("XRP/ETH", "freqtrade feather"), "BTC_USDT-5m.parquet": ("BTC/USDT", "freqtrade parquet"),
              "ETH_BTC-5m.json": ("ETH/BTC", "ohlcv-json"), "LTC_BTC-5m.json.gz": ("LTC/BTC", "ohlcv-json"),
              "futures/BTC_USDT_USDT-5m-futures.feather": ("BTC/USDT:USDT", "freqtrade feather")}
    for name, (symbol, fmt) in expect.items():
        row = got[name]
        assert (row["symbol"], row["timeframe"], row["format"], row["status"], row["rows"]) == (symbol, "5m", fmt, "ok", 300)
        assert_same(Store().read(symbol, "5m", "binance"), df)
    assert got["futures/BTC_USDT_USDT-8h-funding_rate.feather"]["status"] == "skipped"
    assert got["README.txt"]["status"] == "skipped"
    assert main(["data", "import", str(d)]) == 0  # again: every file "unchanged", printed as a table
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["file", "format", "symbol"] and "unchanged" in out


def test_a_bad_file_in_a_data_dir_stops_no_other(tmp_path, capsys):
    d, df = freqtrade_dir(tmp_path)
    (d / "BAD_USDT-5m.feather").write_bytes(b"ARROW1\x00\x00garbage")
    rc, table = run_json(capsys, "data", "import", str(d))
    bad = next(r for r in table if r["file"] == "BAD_USDT-5m.feather")
    assert rc == 1 and bad["status"] == "error" and "damaged feather" in bad["message"]
    assert sum(r["status"] == "ok" for r in table) == 5


def test_generic_parquet_feather_and_arrow_stream(tmp_path):
    import pyarrow as pa

    df = candles(100, "1h")
    titled = df.rename(columns=str.title).set_index("Date")  # a DatetimeIndex, restored from parquet metadata
    titled.to_parquet(tmp_path / "a.parquet")
    epoch = df.assign(timestamp=df["date"].dt.as_unit("ms").astype("int64")).drop(columns="date")
    epoch.to_feather(tmp_path / "b.feather")
    table = pa.Table.from_pandas(df, preserve_index=False)
    with pa.OSFile(str(tmp_path / "c.arrows"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    for name, fmt in [("a.parquet", "parquet"), ("b.feather", "feather"), ("c.arrows", "freqtrade arrow-stream")]:
        clean, report = read_file(tmp_path / name)
        assert (report.format, report.timeframe, len(clean)) == (fmt, "1h", 100), name
        assert clean.index.equals(pd.DatetimeIndex(df["date"]).as_unit("ns").rename("ts"))


def test_the_content_decides_not_the_name(tmp_path):
    df = candles(50)
    df.to_feather(tmp_path / "really_feather.csv")
    (tmp_path / "really_json.txt").write_text(json.dumps(ccxt_list(df)))
    with gzip.open(tmp_path / "csv_in_gzip.dat", "wt") as f:
        df.to_csv(f, index=False)
    for name, fmt in [("really_feather.csv", "freqtrade feather"), ("really_json.txt", "ohlcv-json"),
                      ("csv_in_gzip.dat", "csv")]:
        clean, report = read_file(tmp_path / name)
        assert report.format == fmt and len(clean) == 50, name


# ----- CSV dialects -----------------------------------------------------------------------------
@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
@pytest.mark.parametrize("bom, newline", [("", "\n"), ("\ufeff", "\r\n")])
def test_csv_delimiters_bom_and_crlf(tmp_path, sep, bom, newline):
    df = candles(20)
    text = df.to_csv(index=False, sep=sep, lineterminator=newline, date_format="%Y-%m-%d %H:%M:%S")
    p = tmp_path / "x.csv"
    p.write_bytes((bom + text).encode())
    clean, report = read_file(p, "5m")
    assert report.format == "csv" and len(clean) == 20
    assert_same(clean.rename(columns=str.lower).rename(columns=str.title), df)


@pytest.mark.parametrize("unit, scale", [("ms", 1_000), ("s", 1), ("us", 1_000_000)])
def test_epoch_timestamps_in_csv(tmp_path, unit, scale):
    df = candles(30)
    secs = df["date"].dt.as_unit("s").astype("int64")
    p = tmp_path / "epoch.csv"
    df.assign(date=secs * scale).rename(columns={"date": "timestamp"}).to_csv(p, index=False)
    clean, report = read_file(p)
    assert report.ok and report.timeframe == "5m" and list(clean.index) == list(df["date"])
    assert any("epoch" in n for n in report.notes)


def test_iso_z_and_decimal_comma_csv(tmp_path):
    p = tmp_path / "eu.csv"
    p.write_text("Zeit;Open;High;Low;Close;Volume\n2024-01-01T00:00:00Z;1,5;2,25;1,0;2,0;10\n"
                 "2024-01-01T01:00:00Z;2,0;3,0;1,5;2,5;11\n".replace("Zeit", "date"))
    clean, report = read_file(p)
    assert clean["High"].tolist() == [2.25, 3.0] and report.timeframe == "1h"
    assert any("decimal comma" in n for n in report.notes)


# ----- values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, kind", [("inf", "non-finite"), ("-inf", "non-finite"), ("1e308", "absurdly large"),
                                         ("nan", "not a number")])
def test_non_finite_and_absurd_prices(tmp_path, value, kind):
    df = candles(5)
    df["high"] = df["high"].astype(object)
    df.loc[2, "high"] = value
    p = tmp_path / "bad.csv"
    df.to_csv(p, index=False)
    with pytest.raises(DataValidationError, match=kind):
        read_file(p, "5m", "strict")
    clean, report = read_file(p, "5m", "repair")
    assert len(clean) == 4 and T0 + pd.Timedelta("10min") not in clean.index
    assert report.rows_out == 4 and (report.issues[0].action == "dropped" or "non-numeric" in report.notes[-1])
    assert np.isfinite(clean.to_numpy()).all()


def test_inf_in_json_and_repair_through_the_cli(tmp_path, capsys):
    rows = ccxt_list(candles(10))
    rows[3][2] = float("inf")
    p = tmp_path / "X_USDT-5m.json"
    p.write_text(json.dumps(rows))  # json writes Infinity, which Python's json reads back as inf
    assert main(["data", "import", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "non-finite" in err[0]
    rc, out = run_json(capsys, "data", "import", str(p), "--repair")
    assert rc == 0 and out["rows_added"] == 9 and "non_finite" not in json.dumps(out["report"]["notes"])
    assert "dropped" in out["report"]["issues"][0]


# ----- nothing hangs -----------------------------------------------------------------------------
def test_one_megabyte_single_line_json_imports_in_seconds(tmp_path):
    """freqtrade's UNITTEST_BTC-1m.json shape: 1 MB on one line (pandas took it for a 100,000-column header)."""
    t0 = 1_510_704_000_000
    rows = [[t0 + i * 60_000, 8000.0 + i % 13, 8010.5 + i % 13, 7990.25 + i % 13, 8005.75 + i % 13, 1.2345678]
            for i in range(17_000)]
    p = tmp_path / "UNITTEST_BTC-1m.json"
    p.write_text(json.dumps(rows))
    assert p.stat().st_size > 1_000_000 and b"\n" not in p.read_bytes()
    out = cli("data", "import", str(p), "--json", timeout=60, env=_env(tmp_path))  # hangs = fails here
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["series"]["symbol"] == "UNITTEST/BTC" and res["series"]["rows"] == 17_000
    assert res["report"]["timeframe"] == "1m" and res["report"]["format"] == "ohlcv-json"
    # Named .csv it is still JSON; and as CSV it is refused at once, never parsed as a huge header.
    renamed = tmp_path / "oops.csv"
    renamed.write_bytes(p.read_bytes())
    assert read_file(renamed, "1m")[1].format == "ohlcv-json"
    with pytest.raises(DataValidationError, match=f"longer than {MAX_LINE_BYTES:,} bytes"):
        read_file(renamed, "1m", format="csv")


def test_header_width_is_capped(tmp_path):
    p = tmp_path / "wide.csv"
    p.write_text(",".join(f"c{i}" for i in range(5_000)) + "\n" + ",".join("1" * 5_000) + "\n")
    with pytest.raises(DataValidationError, match=f"more than {MAX_COLUMNS}") as e:
        read_file(p, "1m", format="csv")
    assert len(str(e.value)) < 300


def _env(tmp_path):
    import os

    return {**os.environ, "MOONDEV_LAB_HOME": str(tmp_path / "home")}


def test_a_100_mb_field_costs_bounded_memory_and_a_short_message(tmp_path):
    p = tmp_path / "huge.csv"
    with open(p, "w") as f:
        f.write("date,open,high,low,close,volume\n2024-01-01 00:00,1,2,0.5,1.5,1\n2024-01-01 00:05,")
        block = "7" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(",2,0.5,1.5,1\n")
    probe = textwrap.dedent(f"""
        import json, resource, sys
        from moondev_lab.data.ingest import read_file
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for mode in ("strict", "repair"):
            try:
                read_file({str(p)!r}, "5m", mode)
                msg = None
            except Exception as e:
                msg = f"{{type(e).__name__}}: {{e}}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"msg": msg, "base_mb": base / 1024, "peak_mb": peak / 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    res = json.loads(out.stdout)
    assert res["msg"].startswith("DataValidationError") and "line 3" in res["msg"] and len(res["msg"]) < 200
    assert "777" not in res["msg"]
    assert res["peak_mb"] - res["base_mb"] < 40, res  # one 1 MiB read block, not the 100 MB line

    assert main(["data", "import", str(p), "--symbol", "X/USD"]) == 2  # and the CLI says it in one line


# ----- unknown formats -----------------------------------------------------------------------------
def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.csv", "date,open,high,low,close,volume\n")


@pytest.mark.parametrize("make, detected", [
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (_zip, "ZIP archive"),
    (lambda p: p.write_text("<!DOCTYPE html><html><body>429 Too Many Requests</body></html>"), "HTML page"),
    (lambda p: p.write_text('{"error": "rate limited"}'), "JSON object"),
    (lambda p: p.write_bytes(bytes(range(256)) * 10), "binary data starting 00 01 02"),
    (lambda p: p.write_bytes(b"%PDF-1.4\n..."), "PDF document"),
    (lambda p: p.write_text("hello world\nthis is a note\n"), "not an OHLCV header"),
    (lambda p: p.write_text("x" * 200_000), "first line is longer than 64 KiB"),
])
def test_unknown_formats_name_what_was_detected(tmp_path, capsys, make, detected):
    p = tmp_path / "BTC_USDT-5m.feather"
    make(p)
    with pytest.raises(UnknownFormatError, match=detected) as e:
        detect(p)
    assert len(str(e.value)) < 600
    assert main(["data", "import", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "unknown format" in err[0]


def test_symbol_is_needed_when_the_name_does_not_carry_it(tmp_path, capsys):
    p = tmp_path / "prices.csv"
    candles(10).to_csv(p, index=False)
    assert main(["data", "import", str(p)]) == 2
    assert "--symbol" in capsys.readouterr().err
    rc, out = run_json(capsys, "data", "import", str(p), "--symbol", "ABC/USD")
    assert rc == 0 and out["report"]["timeframe"] == "5m" and out["series"]["rows"] == 10


# ----- a race between two imports of different content ----------------------------------------------
def test_the_losing_side_of_a_race_reports_every_conflict_and_fails(tmp_path):
    n = 20_000
    a, b = candles(n, seed=1), candles(n, seed=2)
    pa_, pb_ = tmp_path / "a.feather", tmp_path / "b.feather"
    a.to_feather(pa_)
    b.to_feather(pb_)
    env = _env(tmp_path)
    argv = lambda p: [sys.executable, "-m", "moondev_lab.cli", "data", "import", str(p), "--symbol", "RACE/USD",  # noqa: E731
                      "--json"]
    procs = [subprocess.Popen(argv(p), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for p in (pa_, pb_)]
    outs = [p.communicate(timeout=120) for p in procs]
    results = sorted((p.returncode, json.loads(o)) for p, (o, _) in zip(procs, outs))
    (rc_win, win), (rc_lose, lose) = results
    assert rc_win == 0 and win["mode"] == "create" and win["conflict_count"] == 0
    assert rc_lose == 2 and lose["mode"] == "unchanged" and lose["conflict_count"] == n  # exact, not capped
    assert len(lose["conflicts"]) <= 100
    loser_err = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    assert f"{n} candles differ" in loser_err and loser_err.count("\n") == 1


# ----- export ------------------------------------------------------------------------------------------
def test_export_round_trips_and_freqtrade_reads_its_layout(tmp_path, capsys):
    d, df = freqtrade_dir(tmp_path)
    assert main(["data", "import", str(d / "XRP_ETH-5m.feather"), "--source", "local"]) == 0
    capsys.readouterr()
    for fmt, suffix in [("csv", "csv"), ("parquet", "parquet"), ("feather", "feather"), ("json", "json"),
                        ("jsongz", "json.gz")]:
        out = tmp_path / f"out.{suffix}"
        rc, res = run_json(capsys, "data", "export", "XRP/ETH", "5m", "--format", fmt, "--out", str(out))
        assert rc == 0 and res["path"] == str(out)
        clean, report = read_file(out, "5m")
        assert report.ok, fmt
        assert_same(clean.rename(columns=str.lower).rename(columns=str.title), df)

    ft = tmp_path / "user_data" / "data" / "kraken"
    rc, res = run_json(capsys, "data", "export", "XRP/ETH", "5m", "--format", "feather", "--freqtrade", str(ft))
    assert rc == 0 and res["path"] == str(ft / "XRP_ETH-5m.feather")
    back = pd.read_feather(res["path"])  # what freqtrade's FeatherDataHandler does
    assert list(back.columns) == ["date", "open", "high", "low", "close", "volume"]
    assert str(back["date"].dt.tz) == "UTC" and back["close"].tolist() == df["close"].tolist()
    assert main(["data", "import", str(ft)]) == 0  # and our own directory import reads it back
    assert_same(Store().read("XRP/ETH", "5m", "kraken"), df)
    capsys.readouterr()
    rc, out = run_json(capsys, "data", "export", "XRP/ETH", "5m", "--format", "csv", "--freqtrade", str(ft),
                       "--source", "local")
    assert rc == 2 and "freqtrade does not read CSV" in out["message"]
    rc, out = run_json(capsys, "data", "export", "NOPE/USD", "5m")
    assert rc == 2 and out["error"] == "SeriesNotFound"



def test_json_candles_in_epoch_seconds_are_not_read_as_1970(tmp_path):
    df = candles(20)
    rows = [[r[0] // 1000, *r[1:]] for r in ccxt_list(df)]
    (tmp_path / "sec.json").write_text(json.dumps(rows))
    clean, report = read_file(tmp_path / "sec.json")
    assert list(clean.index) == list(df["date"]) and any("not epoch milliseconds" in n for n in report.notes)


def test_headerless_binance_klines_and_utf16(tmp_path):
    df = candles(12, "1h")
    ms = df["date"].dt.as_unit("ms").astype("int64")
    lines = [f"{t},{o},{h},{lo},{c},{v},{t + 3_599_999},0,10,0,0,0" for t, o, h, lo, c, v in
             zip(ms, df["open"], df["high"], df["low"], df["close"], df["volume"])]
    (tmp_path / "BTCUSDT-1h-2024-01.csv").write_text("\n".join(lines) + "\n")
    clean, report = read_file(tmp_path / "BTCUSDT-1h-2024-01.csv")
    assert report.timeframe == "1h" and list(clean.index) == list(df["date"]) and any("no header" in n for n in report.notes)
    (tmp_path / "u16.csv").write_text(df.to_csv(index=False), encoding="utf-16")
    clean, report = read_file(tmp_path / "u16.csv")
    assert report.format == "csv" and len(clean) == 12


def test_a_long_bad_value_is_clipped_in_the_message(tmp_path, capsys):
    p = tmp_path / "X_USD-5m.csv"
    df = candles(3).astype({"close": object})
    df.loc[1, "close"] = "z" * 60_000  # under the line cap: parsed, then quoted
    df.to_csv(p, index=False)
    with pytest.raises(DataValidationError, match="is not a number") as e:
        read_file(p)
    assert len(str(e.value)) < 200 and "line 3" in str(e.value)
    assert main(["data", "import", str(p)]) == 2
    assert len(capsys.readouterr().err) < 250
