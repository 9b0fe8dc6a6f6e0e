"""Length-prefixed messages over a stream socket (parent <-> warm worker), and the reply format."""
from __future__ import annotations

import json
import socket
import struct
import time

from .errors import ErrorKind

_HEADER = struct.Struct("!Q")
MAX_MESSAGE = 256 * 2**20


def send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_msg(sock: socket.socket, deadline: float | None = None) -> bytearray | None:
    """One message, or None when the peer closed the connection.

    ``deadline`` (``time.monotonic()``): a ``TimeoutError`` if the whole message has not
    arrived by then, however the peer dribbles it (a per-``recv`` timeout alone would not).
    """
    header = _recv_exactly(sock, _HEADER.size, deadline)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ConnectionError(f"message of {size} bytes exceeds the {MAX_MESSAGE} byte limit")
    return _recv_exactly(sock, size, deadline)


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray | None:
    buf = bytearray(n)  # filled in place: no growing copies of a large reply
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the worker did not answer in time")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not k:
            return None
        got += k
    return buf


#: First byte of a worker message that is not the reply but the task's order log, sent ahead of it
#: (at most one per task; a reply's JSON header always starts with ``{``).
EARLY_TAG = b"E"


def parse_early(raw: bytes | bytearray) -> dict | None:
    """The order-log dict of an early message (after :data:`EARLY_TAG`), or None if it is malformed.

    Untrusted, like a result: size- and type-checked, never raises. It is only a hint (see
    :func:`~moondev_lab.sandbox._settle.early_settlement`): what counts is the result's own log.

    >>> parse_early(b'{"format": 1}'), parse_early(b"[" * 100_000)
    ({'format': 1}, None)
    """
    try:
        if len(raw) > MAX_RESULT:
            return None
        log = json.loads(bytes(raw))
    except (ValueError, TypeError, RecursionError, MemoryError):
        return None
    return log if isinstance(log, dict) else None


def encode_reply(reply: dict, result: bytes) -> bytes:
    """A worker's reply: its JSON header line, then the task child's result bytes, unparsed.

    The worker never parses results (that would leave each worker holding the freed
    pages of every result it saw); the parent does, in :func:`decode_reply`.
    """
    return json.dumps(reply).encode() + b"\n" + result


def decode_reply(raw: bytes | bytearray) -> dict:
    """The parent's side of :func:`encode_reply`: the header, with ``payload`` parsed from the result.

    The header comes from the (trusted) worker; it is still size-checked. The result is
    the task's: it is parsed by :func:`parse_result`, which never raises.
    """
    # The header ends within its first MAX_HEADER bytes; the result after it may be larger (up to MAX_RESULT).
    end = raw.find(b"\n", 0, MAX_HEADER + 1)
    if end <= 0:
        raise ValueError("the worker's reply header is missing or too large")
    head, result = bytes(raw[:end]), bytes(raw[end + 1:])
    reply = json.loads(head)
    if not isinstance(reply, dict):
        raise ValueError("the worker's reply header is not an object")
    reply["payload"] = None
    if result and reply.get("error") is None:
        reply["payload"], reply["error"] = parse_result(result)
    return reply


def parse_result(result: bytes | bytearray) -> tuple[dict | None, dict | None]:
    """``(payload, error)`` from a task child's result: untrusted JSON (never pickle).

    ``error`` is the one the task reported, or ``result_invalid`` if the bytes are
    malformed: too large, nested deeper than :data:`MAX_DEPTH`, wrong field types,
    an unknown error kind. Never raises (a recursion or memory error is a result too).

    >>> parse_result(b"[" * 100_000 + b"]" * 100_000)[1]["kind"]
    'result_invalid'
    """
    try:
        if len(result) > MAX_RESULT:
            raise ValueError(f"the result is {len(result)} bytes, over the {MAX_RESULT} byte limit")
        payload = json.loads(result)
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        return None, _invalid(exc)
    return check_payload(payload)


def check_payload(payload) -> tuple[dict | None, dict | None]:
    """``(payload, error)`` of one decoded payload (a task's, or one run's of a batch), as :func:`parse_result`."""
    try:
        if not isinstance(payload, dict):
            raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
        _check_shape(payload)
        error = None if payload.get("ok") is True else _check_error(payload.get("error"))
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        return None, _invalid(exc)
    return payload, error


def _invalid(exc: BaseException) -> dict:
    reason = "nested too deeply" if isinstance(exc, RecursionError) else _short(exc)
    return {"kind": ErrorKind.RESULT_INVALID.value, "type": type(exc).__name__,
            "message": f"malformed result from the sandbox: {reason}", "traceback": ""}


#: Largest header line / task result the parent parses, and the deepest nesting it accepts.
MAX_HEADER = 4 * 2**20
MAX_RESULT = 64 * 2**20
MAX_DEPTH = 32
#: Types of the result fields the parent reads (others pass: they belong to newer fields).
_FIELD_TYPES = {"ok": bool, "stats": dict, "trades": list, "equity": list, "strategy": (str, type(None)),
                "size_adjustments": int, "skipped_orders": int, "plot_html": (str, type(None)),
                "plot_error": (str, type(None)), "csv_redirects": list, "best_index": int, "values": list,
                "logs": list, "runs": (list, type(None)),
                "best": (dict, type(None)), "error": (dict, type(None))}
_KINDS = frozenset(k.value for k in ErrorKind)


def _check_shape(payload: dict) -> None:
    for name, types in _FIELD_TYPES.items():
        if name in payload and not isinstance(payload[name], types):
            raise TypeError(f"field {name!r} is a {type(payload[name]).__name__}")
    # Iterative depth walk: the JSON decoder accepts ~1000 levels, recursive code downstream may not.
    stack = [(payload, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values() if isinstance(v, (dict, list)))
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj if isinstance(v, (dict, list)))


def _check_error(error) -> dict:
    if not isinstance(error, dict) or error.get("kind") not in _KINDS:
        raise ValueError("a failed result without a valid error kind")
    return {"kind": error["kind"], **{k: _short(error.get(k, ""), 8000) for k in ("type", "message", "traceback")}}


def _short(value, limit: int = 500) -> str:
    return (value if isinstance(value, str) else str(value) if isinstance(value, BaseException)
            else repr(value))[:limit]


# ------------------------------------------------------------------ claimed indicators (display only)
#: A plot-run's task reports at most this many indicators, rows per indicator and points per row.
#: Points: backtesting.py's chart shows at most 10,000 candles (``_plotting._MAX_CANDLES``), so more is never drawn.
MAX_INDICATORS = 32
MAX_INDICATOR_ROWS = 8
INDICATOR_POINTS = 10_000
MAX_INDICATOR_NAME = 200
#: ... and at most this many values in all (40 full rows): a payload's worst case stays a few MiB of JSON.
MAX_INDICATOR_VALUES = 400_000


def sample_index(n_bars: int, points: int):
    """The bars a downsampled indicator row holds: ``points`` evenly spaced bars, first and last kept.

    Both sides compute it from ``(n_bars, points)``, so no index crosses the wire.

    >>> sample_index(10, 4).tolist(), sample_index(3, 3).tolist()
    ([0, 3, 6, 9], [0, 1, 2])
    """
    import numpy as np

    if points >= n_bars:
        return np.arange(n_bars)
    return np.linspace(0, n_bars - 1, points).round().astype(np.int64)


def decode_indicators(value, n_bars: int) -> tuple[list[dict], str | None]:
    """``(indicators, error)`` from a task's claimed indicator list, every bound checked.

    Each entry: ``name`` (a str, or a list of one str per row), ``overlay``, ``scatter``,
    ``plot`` (bools), ``color`` (None, a str or a list of str) and ``values`` (a list of
    rows, each a list of floats, ``min(n_bars, INDICATOR_POINTS)`` long: the bars of
    :func:`sample_index`). The result holds each row as float64. Anything else refuses
    the whole list with a reason (``indicators`` then empty); never raises.
    These are the strategy's own claims: they are drawn, never used for stats or ranking.

    >>> decode_indicators([{"name": "SMA", "values": [[1.0, 2.0]]}], 2)[0][0]["values"].shape
    (1, 2)
    >>> decode_indicators([{"name": "SMA", "values": [["x", 2.0]]}], 2)[1]
    "indicator 0 ('SMA'): values must be numbers"
    """
    import numpy as np

    if value is None:
        return [], None
    try:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of indicators, got {type(value).__name__}")
        if len(value) > MAX_INDICATORS:
            raise ValueError(f"{len(value)} indicators, over the limit of {MAX_INDICATORS}")
        points = min(n_bars, INDICATOR_POINTS)
        out, total = [], 0
        for i, item in enumerate(value):
            out.append(_decode_indicator(i, item, points, np))
            total += out[-1]["values"].size
            if total > MAX_INDICATOR_VALUES:
                raise ValueError(f"over {MAX_INDICATOR_VALUES:,} indicator values in all")
        return out, None
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        return [], _short(exc)


def _decode_indicator(i: int, item, points: int, np) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"indicator {i} is a {type(item).__name__}, not an object")
    name = item.get("name")
    label = f"indicator {i}"
    if isinstance(name, str):
        label += f" ({name[:40]!r})"
    rows = item.get("values")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{label}: values must be a non-empty list of rows")
    if len(rows) > MAX_INDICATOR_ROWS:
        raise ValueError(f"{label}: {len(rows)} rows, over the limit of {MAX_INDICATOR_ROWS}")
    if any(len(r) != points for r in rows):
        raise ValueError(f"{label}: each row must hold {points} points, not {sorted({len(r) for r in rows})[:3]}")
    if not all(type(x) in (float, int) for r in rows for x in r):  # exact types: no bools, no strings
        raise ValueError(f"{label}: values must be numbers")
    names = [name] if isinstance(name, str) else name
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) or (
            not isinstance(name, str) and len(names) != len(rows)):
        raise ValueError(f"{label}: name must be a str, or one str per row")
    color = item.get("color")
    colors = [color] if isinstance(color, str) else color
    if colors is not None and (not isinstance(colors, list) or not all(isinstance(c, str) for c in colors)
                               or len(colors) > MAX_INDICATOR_ROWS):
        raise ValueError(f"{label}: color must be None, a str, or a list of str")
    flags = {k: item.get(k, default) for k, default in (("overlay", False), ("scatter", False), ("plot", True))}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise ValueError(f"{label}: overlay, scatter and plot must be true or false")
    short = [n[:MAX_INDICATOR_NAME] for n in names]
    return {"name": short[0] if isinstance(name, str) else short, "values": np.array(rows, dtype=np.float64),
            "color": None if colors is None else [c[:40] for c in colors], **flags}
