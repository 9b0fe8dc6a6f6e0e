"""Length-prefixed messages over a stream socket (parent <-> warm worker)."""
from __future__ import annotations

import socket
import struct

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
