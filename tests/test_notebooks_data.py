"""The data notebook runs in a real Jupyter kernel through papermill, with parameters."""
from __future__ import annotations

import papermill as pm

from conftest import REPO


def test_data_pool_notebook_runs_with_parameters(tmp_path):
    out = tmp_path / "out.ipynb"
    nb = pm.execute_notebook(str(REPO / "notebooks" / "01_data.ipynb"), str(out), kernel_name="python3",
                             parameters={"start": "2023-02-01", "end": "2023-02-07"}, progress_bar=False,
                             cwd=str(REPO))
    texts = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "577 bars, shares memory with the full series: True" in texts
    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells for o in c.get("outputs", []))
    assert "DataPool" in html  # PoolStats renders as a table
