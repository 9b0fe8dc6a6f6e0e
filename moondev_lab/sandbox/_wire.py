"""Length-prefixed messages over a stream socket (parent <-> warm worker), and the reply format."""
from __future__ import annotations

import json
import socket
import struct

from .errors import ErrorKind

_HEADER = struct.Struct("!Q")
MAX_MESSAGE = 256 * 2**20


def send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_msg(sock: socket.socket) -> bytearray | None:
    """One message, or None when the peer closed the connection."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ConnectionError(f"message of {size} bytes exceeds the {MAX_MESSAGE} byte limit")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)  # filled in place: no growing copies of a large reply
    view = memoryview(buf)
    got = 0
    while got < n:
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
    """The parent's side of :func:`encode_reply`: the header, with ``payload`` parsed from the result."""
    head, _, result = raw.partition(b"\n")
    reply = json.loads(head)
    reply["payload"] = None
    if result and reply.get("error") is None:
        reply["payload"], reply["error"] = parse_result(result)
    return reply


def parse_result(result: bytes | bytearray) -> tuple[dict | None, dict | None]:
    """``(payload, error)`` from a task child's result: untrusted JSON (never pickle).

    ``error`` is the one the task reported, or ``result_invalid`` if the bytes are malformed.
    """
    try:
        payload = json.loads(result)
        if not isinstance(payload, dict):
            raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    except ValueError as exc:
        return None, {"kind": ErrorKind.RESULT_INVALID.value, "type": type(exc).__name__,
                      "message": str(exc)[:500], "traceback": ""}
    return payload, None if payload.get("ok") else payload.get("error")
