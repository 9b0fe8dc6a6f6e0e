"""Batches of notebook runs with papermill, locally and on a real dask.distributed LocalCluster."""
from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from conftest import REPO
from moondev_lab.batch import run_notebooks
from moondev_lab.memory import read_ledger

NB = REPO / "notebooks" / "01_data.ipynb"
PARAMS = [{"start": "2023-02-01", "end": "2023-02-07"}, {"start": "2023-04-01", "end": "2023-04-03"},
          {"start": "not a date", "end": "2023-04-03"}]


def check(report):
    rows = report.table().to_dict("records")
    ok1, ok2, bad = rows
    assert ok1["status"] == ok2["status"] == "ok"
    assert bad["status"] == "failed" and "not a date" in bad["error"]  # reported, the others still ran
    for row in (ok1, ok2):
        ledger = read_ledger(row["output"])
        assert row["cells_watched"] == len(ledger) >= 5  # every cell after %memwatch on has a record
        assert row["max_cell_peak_mib"] >= 0 and ledger["exact"].all()
    assert "2/3 runs ok" in repr(report)


def test_batch_on_local_kernels(tmp_path, capfd):
    check(run_notebooks(NB, PARAMS, tmp_path / "out", parallel=2, progress=False))
    err = capfd.readouterr().err  # the kernels write to this process's stderr
    assert "without encryption" not in err and "MissingIDFieldWarning" not in err, err


@pytest.mark.timeout(240)
def test_batch_on_a_dask_local_cluster(tmp_path):
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        report = run_notebooks(NB, PARAMS, tmp_path / "out", client=client, progress=False)
    check(report)


def test_batch_command(tmp_path):
    import json
    import subprocess
    import sys

    params = tmp_path / "params.json"
    params.write_text(json.dumps(PARAMS[:1]))
    out = subprocess.run([sys.executable, "-m", "moondev_lab.cli", "batch", str(NB), "--params", str(params),
                          "--out", str(tmp_path / "o"), "--json"], capture_output=True, text=True, cwd=REPO,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["status"] == "ok" and row["start"] == "2023-02-01" and row["cells_watched"] >= 5
