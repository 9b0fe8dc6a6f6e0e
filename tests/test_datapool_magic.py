"""%datapool reports the DataPool the user built, not only the default one."""
from __future__ import annotations

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


def test_datapool_reports_the_users_pool(lab_home):
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext moondev_lab")
    try:
        ip.run_cell("import moondev_lab as ml\nmine = ml.DataPool()\ndf = mine.get('BTC/USD', '15m')")
        with capture_output() as cap:
            res = ip.run_cell("%datapool mine -o")
        assert res.success and res.result.entries == 1 and res.result.misses == 1, res.result
        assert "mine" in "".join(str(o.data) for o in cap.outputs)
        with capture_output() as cap:
            res = ip.run_cell("%datapool -o")
        shown = "".join(str(o.data) for o in cap.outputs)
        assert res.success and "mine" in shown and res.result.entries == 1
        with capture_output() as cap:
            ip.run_cell("%datapool df")
        assert "is not a DataPool" in cap.stdout
    finally:
        ip.run_cell("%unload_ext moondev_lab")
        ip.run_cell("mine.clear(); del mine, df; import gc; gc.collect()")  # leave no cache for later tests
