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
    head, _, result = bytes(raw).partition(b"\n") if len(raw) <= MAX_HEADER else (b"", b"", b"")
    if len(head) > MAX_HEADER or not head:
        raise ValueError("the worker's reply header is missing or too large")
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
