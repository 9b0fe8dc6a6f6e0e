"""Ingest and validation: the quirky real CSV round-trips exactly; bad input is named or repaired."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from conftest import BTC_CSV
from moondev_lab.data import DataValidationError, Store, from_ccxt, from_frame, read_csv

HEADER = "datetime, open, high, low, close, volume,\n"
GOOD = [
    "2023-01-01 00:00:00, 100.0, 110.0, 95.0, 105.0, 1.5,",
    "2023-01-01 00:15:00, 105.0, 112.0, 101.0, 108.0, 2.5,",
    "2023-01-01 00:30:00, 108.0, 109.0, 100.0, 101.0, 3.5,",
    "2023-01-01 00:45:00, 101.0, 103.0, 99.0, 102.0, 4.5,",
]


def write_csv(tmp_path, lines, header=HEADER):
    p = tmp_path / "in.csv"
    p.write_text(header + "\n".join(lines) + "\n")
    return p


def test_real_quirky_csv_round_trips_exactly(tmp_path):
    store = Store(tmp_path / "store")
    res = store.import_csv(BTC_CSV, "BTC/USD", "15m")
    assert res.mode == "create" and res.manifest.rows == 31066
    df = store.read("BTC/USD", "15m")
    # Compare against an independent, line-by-line parse of the text with float().
    lines = BTC_CSV.read_text().splitlines()
    assert lines[0] == "datetime, open, high, low, close, volume,"
    parsed = [line.rstrip(",").split(",") for line in lines[1:]]
    ts = [datetime.strptime(p[0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc) for p in parsed]
    assert list(df.index) == [pd.Timestamp(t) for t in ts]
    for j, col in enumerate(["Open", "High", "Low", "Close", "Volume"], start=1):
        expected = np.array([float(p[j]) for p in parsed])
        assert np.array_equal(df[col].to_numpy(), expected), col
    # And back out to CSV and in again: identical frame.
    out = tmp_path / "out.csv"
    df.to_csv(out)
    again, report = read_csv(out, "15m")
    assert report.ok and again.equals(df)
    assert len(res.report.gaps) == 2 and res.report.gaps[0].missing_bars > 0  # real exchange gaps, flagged


@pytest.mark.parametrize("line, kind, where", [
    ("2023-01-01 00:15:00, 105.0, 112.0, 101.0, , 2.5,", "missing_value", "line 3"),
    ("2023-01-01 00:15:00, 105.0, 112.0, 101.0, abc, 2.5,", "not a number", "line 3"),
    ("2023-01-01 00:15:00, -105.0, 112.0, 101.0, 108.0, 2.5,", "non_positive_price", "line 3"),
    ("2023-01-01 00:15:00, 105.0, 100.0, 101.0, 108.0, 2.5,", "high_low_bounds", "line 3"),
    ("2023-01-01 00:15:00, 105.0, 112.0, 106.0, 108.0, 2.5,", "high_low_bounds", "line 3"),
    ("not a date, 105.0, 112.0, 101.0, 108.0, 2.5,", "bad_timestamp", "line 3"),
    ("2023-01-01 00:15:00, 105.0, 112.0, 101.0, 108.0, -2.5,", "negative_volume", "line 3"),
])
def test_strict_mode_names_the_row(tmp_path, line, kind, where):
    p = write_csv(tmp_path, [GOOD[0], line, *GOOD[2:]])
    with pytest.raises(DataValidationError) as e:
        read_csv(p, "15m", "strict")
    msg = str(e.value)
    assert where in msg and "in.csv" in msg
    assert kind in msg or (e.value.report and e.value.report.issues[0].kind == kind)


def test_repair_mode_reports_every_change(tmp_path):
    lines = [
        GOOD[0],
        "2023-01-01 00:15:00, 105.0, 100.0, 101.0, 108.0, 2.5,",  # high below close: fixed
        "2023-01-01 00:30:00, 108.0, 109.0, 100.0, , 3.5,",  # missing close: dropped
        GOOD[3],
        "2023-01-01 00:45:00, 101.0, 103.0, 99.0, 102.0, 4.5,",  # exact duplicate: dropped
        "2023-01-01 01:00:00, 0, 103.0, 99.0, 102.0, 4.5,",  # zero open: dropped
    ]
    clean, report = read_csv(write_csv(tmp_path, lines), "15m", "repair")
    kinds = sorted(i.kind for i in report.issues)
    assert kinds == ["duplicate", "high_low_bounds", "missing_value", "non_positive_price"]
    assert all(i.action for i in report.issues)
    assert report.rows_in == 6 and report.rows_out == len(clean) == 3
    fixed = clean.loc["2023-01-01 00:15"]
    assert fixed["High"] == 108.0 and fixed["Low"] == 100.0  # now bounds every observed price
    assert "fixed High 100.0 -> 108.0, Low 101.0 -> 100.0" in repr(report)
    assert len(report.gaps) == 1  # 00:30 was dropped, leaving a flagged gap
    assert "<table" in report._repr_html_()


def test_unsorted_and_duplicate_timestamps(tmp_path):
    lines = [GOOD[1], GOOD[0], GOOD[2], GOOD[3]]
    with pytest.raises(DataValidationError, match="not in increasing order"):
        read_csv(write_csv(tmp_path, lines), "15m")
    clean, report = read_csv(write_csv(tmp_path, lines), "15m", "repair")
    assert clean.index.is_monotonic_increasing and len(clean) == 4
    assert report.issues[0].action == "sorted all rows by timestamp"
    dup = [GOOD[0], GOOD[1], GOOD[1].replace("108.0, 2.5", "108.5, 9.9"), GOOD[2]]
    with pytest.raises(DataValidationError, match="repeated"):
        read_csv(write_csv(tmp_path, dup), "15m")
    clean, report = read_csv(write_csv(tmp_path, dup), "15m", "repair")
    assert clean.loc["2023-01-01 00:15", "Close"] == 108.5  # later row wins, and it is reported
    assert "different values" in report.issues[0].message


def test_timezone_consistency(tmp_path):
    mixed = [GOOD[0].replace("00:00:00", "00:00:00+00:00"), *GOOD[1:]]
    with pytest.raises(DataValidationError, match="timezone-consistent"):
        read_csv(write_csv(tmp_path, mixed), "15m")
    aware = [g.replace(":00,", ":00+01:00,", 1) for g in GOOD]
    clean, report = read_csv(write_csv(tmp_path, aware), "15m")
    assert str(clean.index[0]) == "2022-12-31 23:00:00+00:00"


def test_malformed_csv_files(tmp_path):
    with pytest.raises(DataValidationError, match="missing column"):
        read_csv(write_csv(tmp_path, ["2023-01-01,1,2,3"], header="date,open,high,low\n"), "15m")
    with pytest.raises(DataValidationError, match="malformed CSV"):
        read_csv(write_csv(tmp_path, [GOOD[0], "2023-01-01 00:15:00,1,2,3,4,5,6,7,8,9"]), "15m")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataValidationError, match="empty"):
        read_csv(tmp_path / "empty.csv", "15m")
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "nope.csv", "15m")
    with pytest.raises(ValueError, match="unknown timeframe"):
        read_csv(write_csv(tmp_path, GOOD), "15 minutes")


def test_ccxt_rows_and_none_rows():
    t0 = 1_704_067_200_000
    rows = [[t0 + i * 3_600_000, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 5.0] for i in range(3)]
    clean, report = from_ccxt(rows, "1h")
    assert report.ok and clean.index[0] == pd.Timestamp(t0, unit="ms", tz="UTC")
    # What ccxt returns for a 200 response with a non-JSON body:
    with pytest.raises(DataValidationError, match="ccxt candle 1"):
        from_ccxt([rows[0], [None] * 6, rows[2]], "1h")
    with pytest.raises(DataValidationError, match="expected"):
        from_ccxt([[1, 2]], "1h")


def test_dataframe_input_epoch_and_naive():
    idx = pd.date_range("2024-01-01", periods=4, freq="1h")
    df = pd.DataFrame({"open": [1, 2, 3, 4], "high": [2, 3, 4, 5], "low": [0.5, 1, 2, 3],
                       "close": [1.5, 2.5, 3.5, 4.5], "volume": [1, 1, 1, 1]}, index=idx)
    clean, report = from_frame(df, "1h")
    assert str(clean.index.tz) == "UTC" and "naive timestamps were taken as UTC" in report.notes
    epoch = df.reset_index(drop=True).assign(timestamp=idx.asi8 // 1_000_000)  # epoch ms
    clean2, _ = from_frame(epoch, "1h")
    assert clean2.index.equals(clean.index)
