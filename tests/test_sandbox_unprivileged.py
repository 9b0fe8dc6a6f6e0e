"""The hostile battery again, as an ordinary user: the same containment without root.

The interpreter of these machines lives under root's 0700 home, which another uid
cannot execute, so this builds a venv on Debian's ``/usr/bin/python3`` owned by the
test uid, in ``/var/tmp/moondev-unpriv-<hash of pyproject.toml>`` (kept between runs),
installs the project into it, and runs ``tests/hostile_battery.py`` there under
``setpriv --reuid=U --regid=U --clear-groups``. ``make unpriv-venv`` builds it ahead.
Skipped when not root (nothing to drop) or when setpriv/python3 are missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UID = 64123  # no passwd entry needed: HOME is set explicitly
SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                                reason="needs root (to drop to another uid) and Debian's /usr/bin/python3")


def venv_dir() -> Path:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    return Path(f"/var/tmp/moondev-unpriv-{digest}")


def as_user(args: list[str], *, timeout: float, env: dict | None = None, cwd: str | None = None):
    base = {"PATH": "/usr/bin:/bin", "HOME": str(venv_dir() / "home"), "LANG": "C.UTF-8"}
    return subprocess.run([SETPRIV, f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *args],
                          env={**base, **(env or {})}, cwd=cwd or "/", capture_output=True, text=True,
                          timeout=timeout)


def ensure_venv_tools() -> None:
    """Debian ships ``venv``/``ensurepip`` separately (python3-venv): install it if a fresh machine lacks it."""
    ok = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["apt-get", "install", "-y", "-q", "python3-venv"], check=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)


def build_venv() -> Path:
    """The unprivileged venv with the project installed (reused while pyproject.toml is unchanged)."""
    d = venv_dir()
    stamp = d / ".installed-editable"
    if stamp.exists():
        _sync_sources(d / "src")
        return d
    ensure_venv_tools()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o755)
    (d / "home").mkdir()
    os.chown(d, UID, UID)
    os.chown(d / "home", UID, UID)
    src = d / "src"  # a copy the user can read, without the checkout's .venv, .git or .env
    shutil.copytree(REPO, src, ignore=_IGNORE)
    _chown_tree(src)
    # --no-compile: byte-compiling every installed module is a third of the install (21 s of 57 here);
    # the battery compiles only what it imports, once, into the user's own venv.
    for step in ([SYSTEM_PYTHON, "-m", "venv", str(d / "venv")],
                 [str(d / "venv/bin/pip"), "install", "-q", "--no-compile", "--disable-pip-version-check", "-e",
                  f"{src}[dev]"]):
        r = as_user(step, timeout=1800)
        if r.returncode:
            raise RuntimeError(f"{' '.join(step)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    stamp.write_text("ok")
    return d


_IGNORE = shutil.ignore_patterns(".venv", ".git", ".env", "*.egg-info", "__pycache__")


def _chown_tree(top: Path) -> None:
    os.chown(top, UID, UID)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), UID, UID)


def _sync_sources(src: Path) -> None:
    """The venv is cached by pyproject.toml, the code is not: copy the current package and tests in."""
    for sub in ("moondev_lab", "tests", "data"):
        shutil.rmtree(src / sub, ignore_errors=True)
        shutil.copytree(REPO / sub, src / sub, ignore=_IGNORE)
        _chown_tree(src / sub)


def run_battery(extra_env: dict | None = None) -> dict:
    d = build_venv()
    work = d / "home"
    r = as_user([str(d / "venv/bin/python"), str(d / "src/tests/hostile_battery.py"), "--json"],
                timeout=900, env=extra_env, cwd=str(work))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def battery() -> dict:
    return run_battery()


def test_battery_runs_as_an_ordinary_user(battery):
    assert battery["uid"] == UID and battery["euid"] == UID
    assert battery["layers"]["user_namespace"] == "on", battery["layers"]
    assert battery["layers"]["landlock"].startswith("on") and battery["layers"]["seccomp"].startswith("on")


def test_every_case_is_contained_without_root(battery):
    escaped = {name: why for name, why in battery["cases"].items() if why is not None}
    assert not escaped, escaped
    assert len(battery["cases"]) >= 25


def test_degraded_without_user_namespaces_as_an_ordinary_user():
    out = run_battery({"MOONDEV_LAB_SANDBOX_DISABLE": "userns", "HOSTILE_CASES": "degraded"})
    assert out["layers"]["user_namespace"].startswith("off")
    escaped = {name: why for name, why in out["cases"].items() if why is not None}
    assert not escaped, escaped


def test_live_session_battery_as_an_ordinary_user():
    """The live StrategySession as a normal user: in the pool's namespaces, every session case contained."""
    out = run_battery({"HOSTILE_TARGET": "session"})
    assert out["uid"] == UID and out["layers"]["user_namespace"] == "on", out["layers"]
    assert out["layers"]["namespaces"].startswith("on") and out["layers"]["landlock"].startswith("on")
    escaped = {name: why for name, why in out["cases"].items() if why is not None}
    assert not escaped, escaped
    assert len(out["cases"]) >= 15


def test_live_session_battery_degraded_as_an_ordinary_user():
    out = run_battery({"HOSTILE_TARGET": "session", "MOONDEV_LAB_SANDBOX_DISABLE": "userns"})
    assert out["layers"]["user_namespace"].startswith("off") and out["layers"]["landlock"].startswith("on")
    escaped = {name: why for name, why in out["cases"].items() if why is not None}
    assert not escaped, escaped


if __name__ == "__main__":  # `make unpriv-venv`
    print(build_venv())
    sys.exit(0)
