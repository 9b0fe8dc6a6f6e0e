"""The RBI notebooks run top to bottom in a real kernel through papermill, offline, with inline plots."""
from __future__ import annotations

import re

import nbformat
import papermill as pm
import pytest
from traitlets.config import Config

from conftest import REPO
from moondev_lab.memory import read_ledger
from moondev_lab.results import read_results

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, tmp_path, **parameters):
    out = tmp_path / name.replace(".ipynb", ".out.ipynb")
    # IPC transport: no "Kernel is running over TCP without encryption" warning from the kernel
    pm.execute_notebook(str(NOTEBOOKS / name), str(out), kernel_name="python3", parameters=parameters,
                        progress_bar=False, cwd=str(tmp_path), config=Config({"KernelManager": {"transport": "ipc"}}))
    return out, nbformat.read(str(out), as_version=4)


def outputs(nb, mime: str) -> list[str]:
    return [o.get("data", {}).get(mime, "") for c in nb.cells for o in c.get("outputs", [])]


def assert_overfitting_shown(nb) -> None:
    """The cell tagged "overfitting" shows the summary, the CSCV logit histogram and the walk-forward equity."""
    cell = next(c for c in nb.cells if "overfitting" in c.metadata.get("tags", []))
    page = "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)
    assert "moondev-overfitting" in page and ">dsr<" in page and ">wf efficiency<" in page
    assert page.count('<img src="data:image/png;base64,') == 2  # the histogram and the equity


def stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_without_outputs_and_starting_with_memwatch(name):
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.splitlines()[:2] == ["%load_ext moondev_lab", "%memwatch on"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert all("id" in c for c in nb.cells)  # no MissingIDFieldWarning


@pytest.mark.timeout(300)
def test_quickstart_runs_offline_with_an_inline_plot(tmp_path):
    out, nb = execute("00_quickstart.ipynb", tmp_path)
    js = "".join(outputs(nb, "application/javascript"))
    html = "".join(outputs(nb, "text/html"))
    # BokehJS itself is in the notebook (inline), not fetched from a CDN
    assert len(js) > 1_000_000 and "Bokeh" in js
    assert not re.search(r"<script[^>]+src=[\"']https?:", html + js) and "cdn.bokeh.org" not in html
    plot_cell = next(c for c in nb.cells if "backtest-plot" in c.metadata.get("tags", []))
    plot_html = "".join(o.get("data", {}).get("text/html", "") for o in plot_cell.outputs)
    assert "moondev-plot" in plot_html and "run " in plot_html and "GridPlot(id" not in stream_text(nb)
    assert '"RSI"' in plot_html  # the strategy's indicator panel, drawn on the trusted side
    text = stream_text(nb) + "".join(outputs(nb, "text/plain"))
    assert "[memwatch" in text and "Jupyter Notebook detected" not in text
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
    assert len(read_ledger(out)) >= 8  # every cell after %memwatch on recorded
    assert any("parity-placeholder" in c.metadata.get("tags", []) for c in nb.cells)
    assert_overfitting_shown(nb)


@pytest.mark.timeout(300)
def test_rbi_template_records_a_result_a_batch_reads_back(tmp_path, lab_home):
    ledger = tmp_path / "batch.sqlite"
    out, nb = execute("rbi_template.ipynb", tmp_path, idea="20/50 SMA crossover", symbol="BTC/USD",
                      timeframe="15m", model="offline", target=5.0, start="2023-05-01", end="2023-08-01",
                      ledger_path=str(ledger))
    (res,) = read_results(out)
    assert res["status"] == "ok" and res["symbol"] == "BTC/USD" and res["ledger"] == str(ledger)
    assert res["run_id"] >= 1 and "Return [%]" in res["out_of_sample"] and res["run_dir"]
    from moondev_lab.results import load_run
    from moondev_lab.ledger import Ledger

    assert load_run(res["run_id"], Ledger(ledger)).params == res["params"]
    cells = read_ledger(out)
    assert len(cells) >= 3 and cells["exact"].all()


@pytest.mark.timeout(300)
def test_research_backtest_notebook_compares_two_ideas(tmp_path):
    _, nb = execute("02_research_backtest.ipynb", tmp_path)
    html = "".join(outputs(nb, "text/html"))
    assert "research model: offline" in stream_text(nb)
    assert "RBIReport" in html and "side by side" in html and "moondev-plot" in html
    assert_overfitting_shown(nb)
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
