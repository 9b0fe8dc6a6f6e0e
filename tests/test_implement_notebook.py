"""notebooks/03_implement.ipynb runs offline in a real kernel through papermill, and shows no key."""
from __future__ import annotations

import json

import papermill as pm

from conftest import REPO
from fake_exchange import API_SECRET


def test_implement_notebook_runs_offline(tmp_path):
    src = REPO / "notebooks" / "03_implement.ipynb"
    assert all(not c.get("outputs") for c in json.loads(src.read_text())["cells"] if c["cell_type"] == "code")
    out = tmp_path / "out.ipynb"
    nb = pm.execute_notebook(str(src), str(out), kernel_name="python3", progress_bar=False, cwd=str(REPO),
                             parameters={"start": "2023-01-01", "end": "2023-01-20"})
    texts = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "new->connecting" in texts and "connecting->ready" in texts
    assert "parity OK" in texts
    assert "parity MISMATCH" in texts and "indicator look-ahead" in texts
    assert "trading | position" in texts
    assert API_SECRET not in out.read_text()
