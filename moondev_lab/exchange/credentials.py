"""API keys for (exchange, account), from the environment or ``$MOONDEV_LAB_HOME/credentials.toml``.

Environment first: ``BINANCE_API_KEY`` / ``BINANCE_API_SECRET`` (and
``..._API_PASSWORD`` where an exchange wants one) for the ``default`` account,
``BINANCE_<ACCOUNT>_API_KEY`` ... for a named one. Otherwise the config file,
which must be private to its owner (mode 0600, like ssh keys)::

    [binance.default]
    api_key = "..."
    secret = "..."

A ``Credentials`` never shows its values: not in ``repr``, ``str`` or errors.

>>> import os; os.environ["KRAKEN_API_KEY"] = "abcd1234"; os.environ["KRAKEN_API_SECRET"] = "s3cr3t-xyz"
>>> load_credentials("kraken")
Credentials(kraken/default from env: key set, secret set)
>>> del os.environ["KRAKEN_API_KEY"], os.environ["KRAKEN_API_SECRET"]
"""
from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import home
from ..errors import AuthError
from ._scrub import register_secret


@dataclass(frozen=True)
class Credentials:
    exchange: str
    account: str = "default"
    api_key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    source: str = "none"

    def __post_init__(self):
        for value in (self.api_key, self.secret, self.password):
            register_secret(value)

    @property
    def present(self) -> bool:
        return bool(self.api_key and self.secret)

    def ccxt_config(self) -> dict[str, str]:
        """The keys as ccxt wants them (only set ones)."""
        out = {"apiKey": self.api_key, "secret": self.secret, "password": self.password}
        return {k: v for k, v in out.items() if v}

    def __repr__(self) -> str:
        have = ", ".join(f"{n} {'set' if v else 'missing'}" for n, v in
                         (("key", self.api_key), ("secret", self.secret)))
        return f"Credentials({self.exchange}/{self.account} from {self.source}: {have})"

    __str__ = __repr__


def credentials_path() -> Path:
    return home() / "credentials.toml"


def _env_prefix(exchange: str, account: str) -> str:
    parts = [exchange] + ([] if account == "default" else [account])
    return "_".join(p.upper().replace("-", "_") for p in parts)


def load_credentials(exchange: str, account: str = "default", *, path: Path | None = None) -> Credentials:
    """Keys for ``exchange``/``account``; a ``Credentials`` with nothing set when there are none.

    Raises ``AuthError`` when the config file is readable by others or malformed
    (the message names the file, never its contents).
    """
    prefix = _env_prefix(exchange, account)
    key, secret = os.environ.get(f"{prefix}_API_KEY"), os.environ.get(f"{prefix}_API_SECRET")
    if key or secret:
        return Credentials(exchange, account, key, secret, os.environ.get(f"{prefix}_API_PASSWORD"), "env")
    path = path or credentials_path()
    if not path.exists():
        return Credentials(exchange, account)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                        f"run: chmod 600 {path}", exchange=exchange)
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        # The decoder's message quotes no values, only positions.
        raise AuthError(f"{path} is not valid TOML ({type(e).__name__} at {getattr(e, 'lineno', '?')})",
                        exchange=exchange) from None
    entry = table.get(exchange, {}).get(account)
    if entry is None:
        return Credentials(exchange, account)
    if not isinstance(entry, dict):
        raise AuthError(f"{path}: [{exchange}.{account}] must be a table with api_key and secret", exchange=exchange)
    return Credentials(exchange, account, entry.get("api_key"), entry.get("secret"), entry.get("password"),
                       str(path.name))


def save_credentials(exchange: str, account: str, api_key: str, secret: str, *, password: str | None = None,
                     path: Path | None = None) -> Path:
    """Add or replace one entry in the config file, created 0600 before anything is written to it."""
    path = path or credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = tomllib.loads(path.read_text()) if path.exists() else {}
    table.setdefault(exchange, {})[account] = {"api_key": api_key, "secret": secret,
                                               **({"password": password} if password else {})}
    lines = []
    for ex_name, accounts in table.items():
        for acc, entry in accounts.items():
            lines.append(f"[{_toml_key(ex_name)}.{_toml_key(acc)}]")
            lines += [f"{k} = {_toml_str(v)}" for k, v in entry.items()]
            lines.append("")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path


def _toml_key(k: str) -> str:
    return k if k.replace("-", "").replace("_", "").isalnum() else _toml_str(k)


def _toml_str(v: str) -> str:
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
