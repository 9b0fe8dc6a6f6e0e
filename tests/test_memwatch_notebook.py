"""Real kernels: the ledger survives papermill, and --limit --interrupt spares the kernel."""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

from moondev_lab.memory import exact_peak_supported, read_ledger

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "notebooks" / "04_memory.ipynb"
MIB = 2**20
pytestmark = pytest.mark.skipif(not exact_peak_supported(), reason="/proc/self/clear_refs not writable here")


def _tagged(nb, tag: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", []))


@pytest.mark.timeout(120)
def test_papermill_output_carries_the_ledger(tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path / "home"))
    out = tmp_path / "04_memory.out.ipynb"
    pm.execute_notebook(str(DEMO), str(out), kernel_name="python3", cwd=str(tmp_path), progress_bar=False)

    df = read_ledger(out)
    nb = nbformat.read(str(out), as_version=4)
    cells = df[df["kind"] == "cell"]
    # every code cell after `%memwatch on` carries exactly one ledger record
    code_after_on = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and i > 1]
    assert sorted(cells["cell_index"]) == code_after_on
    assert cells["exact"].all()

    transient = cells.set_index("cell_index").loc[_tagged(nb, "transient")]
    assert abs(transient["peak_above_start"] - 100 * MIB) / (100 * MIB) < 0.02
    assert abs(transient["delta"]) < 5 * MIB

    # the multi-line string was executed exactly as written
    ml = nb.cells[_tagged(nb, "multiline")]
    printed = "".join(o.get("text", "") for o in ml.outputs if o.output_type == "stream")
    assert printed.strip() == repr("\nSELECT *\n    FROM candles\n        WHERE close > open\n")

    # the runaway cell was stopped by the watchdog and the notebook went on
    runaway = nb.cells[_tagged(nb, "runaway")]
    text = "".join(o.get("text", "") for o in runaway.outputs if o.output_type == "stream")
    assert "stopped by memwatch after" in text
    assert cells.set_index("cell_index").loc[_tagged(nb, "runaway"), "limit_exceeded"]
    alive = nb.cells[_tagged(nb, "runaway") + 1]
    assert "the kernel is still alive" in "".join(o.get("text", "") for o in alive.outputs)


@pytest.mark.timeout(90)
def test_limit_interrupt_stops_a_runaway_cell_and_the_kernel_lives_on(tmp_path, monkeypatch):
    from jupyter_client.manager import start_new_kernel

    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path / "home"))
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def execute(code: str, timeout: float = 45):
            msg_id = kc.execute(code)
            outputs = []
            deadline = time.monotonic() + timeout
            while True:
                msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "status" and msg["content"]["execution_state"] == "idle":
                    break
                if kind in ("stream", "display_data", "execute_result", "error"):
                    outputs.append(msg["content"])
            reply = kc.get_shell_msg(timeout=timeout)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = kc.get_shell_msg(timeout=timeout)
            return reply["content"], outputs

        reply, _ = execute("%load_ext moondev_lab\nfrom moondev_lab.memory import PeakMeter\n"
                           "limit = PeakMeter().rss() // 2**20 + 250\n%memwatch on --limit {limit}MiB --interrupt")
        assert reply["status"] == "ok"
        t0 = time.monotonic()
        reply, outputs = execute("hog = []\nwhile True:\n    hog.append(b'x' * 2**20)")
        assert time.monotonic() - t0 < 30
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        (rec,) = [o["data"]["application/vnd.moondev.memwatch+json"] for o in outputs
                  if "application/vnd.moondev.memwatch+json" in o.get("data", {})]
        assert rec["limit_exceeded"] and rec["peak_above_start"] > 200 * MIB

        reply, outputs = execute("n = len(hog)\ndel hog\nn + 0")
        assert reply["status"] == "ok"
        result = [o for o in outputs if "execution_count" in o and "data" in o]
        assert int(result[0]["data"]["text/plain"]) >= 200
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
