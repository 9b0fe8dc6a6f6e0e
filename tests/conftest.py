"""Shared fixtures: every test gets its own MOONDEV_LAB_HOME, and nothing reaches the internet."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BTC_CSV = SHARED_DATA / "BTC-USD-15m.csv" if (SHARED_DATA / "BTC-USD-15m.csv").exists() else REPO / "data" / "BTC-USD-15m.csv"
IDEAS_CSV = SHARED_DATA / "strategy_ideas.csv"


#: The slowest test files, slowest first (a fresh clone on the 2-core CI machine: the unprivileged
#: battery builds its venv, about 4 min; the live sessions about 2.5 min; the rest 1 min or less).
#: ``make test`` runs pytest-xdist with ``--dist loadfile --no-loadscope-reorder``, which hands out
#: whole files in this order, so the long ones start first and the short ones fill in at the end.
#: By default xdist would sort files by their number of tests, and the battery (5 tests) started
#: last, alone on one worker for its last few minutes.
SLOW_FIRST = ("test_sandbox_unprivileged.py", "test_live.py", "test_batch_ideas.py", "test_live_spot.py",
              "test_sources.py", "test_magics.py", "test_cli_rbi.py", "test_browser.py", "test_exchange.py",
              "test_session_hostile.py", "test_sandbox_hostile.py", "test_notebooks_rbi.py", "test_fast.py",
              "test_memory.py", "test_exact_stats.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(autouse=True)
def lab_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o755)  # sandbox workers may run as an unprivileged uid
    monkeypatch.setenv("MOONDEV_LAB_HOME", str(home))
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(autouse=True, scope="session")
def _no_internet():
    """Fail loudly if anything tries to connect beyond the loopback."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            raise OSError(f"test tried to reach {address!r}: tests must stay on 127.0.0.1")
        return real(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real


@pytest.fixture(autouse=True, scope="session")
def _numba_cache(tmp_path_factory):
    """One numba cache for the whole session (and kept across sessions), so the broker compiles once.

    Without it, each test's fresh MOONDEV_LAB_HOME would get its own cache; pytest's
    base temp dir is per session, its parent survives them.
    """
    if not os.environ.get("NUMBA_CACHE_DIR"):
        from moondev_lab._numba_cache import kernel_key, keyed_cache_dir

        # Keyed by the kernel sources, as the product's own cache is: an edited kernel never
        # runs a stale compiled loop from an earlier session.
        root = tmp_path_factory.getbasetemp().parent / "numba-cache"
        os.environ["NUMBA_CACHE_DIR"] = str(keyed_cache_dir(root, kernel_key()))
    yield
