#!/usr/bin/env python3
"""Opens COUNT connections to one server, makes one exchange on each, and holds them open.

    hold-connections.py KIND HOST PORT COUNT [PATH] [TOKEN]

KIND is one of
  http  POST PATH with a 64-byte body (and `Authorization: Bearer TOKEN` when given), one answer
        read whole (status 200 expected), then the connection idles (HTTP/1.1 keep-alive);
  https the same over TLS (the server's certificate is not verified: a benchmark's own);
  ws    GET /api/ws (the fedbus client websocket, TOKEN as its credential), then one fedbus
        Request frame for PATH and its Response read back, then the session idles;
  nats  CONNECT + PING, PONG read back, then the client idles.

Prints `held COUNT` once every connection has had its exchange, then waits for a line (or the
end) on stdin, closes every connection, and prints `closed`. Anything unexpected (a refused
connection, another status, a timeout of 30 s on one exchange) exits 1 with the reason. Used by
benches/memory-per-connection.sh; the caller raises the open-file limit.
"""
import asyncio
import base64
import os
import ssl
import struct
import sys

BODY = b"x" * 64
MAGIC = 0xFB
HEADER = struct.Struct(">BBBBIQII")  # magic, kind, flags, hops, partition, id, meta_len, payload_len
KIND_REQUEST, KIND_RESPONSE = 1, 2
TAG_PATH = 24
OPEN_AT_ONCE = 256
STEP_TIMEOUT_S = 30


async def read_http_answer(r):
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await r.readexactly(length)
    return status, head


def ws_frame(opcode, payload):
    """A masked (client) websocket frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_ws_message(r):
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await r.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await r.readexactly(8))
    return b0 & 0x0F, await r.readexactly(n)


async def exchange(kind, r, w, host, path, token):
    if kind in ("http", "https"):
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        w.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
            + BODY
        )
        await w.drain()
        status, head = await read_http_answer(r)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
    elif kind == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        w.write(
            f"GET /api/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n".encode()
        )
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:200]!r}")
        p = path.encode()
        meta = struct.pack(">BH", TAG_PATH, len(p)) + p
        frame = HEADER.pack(MAGIC, KIND_REQUEST, 0, 0, 0, 1, len(meta), len(BODY)) + meta + BODY
        w.write(ws_frame(2, frame))
        await w.drain()
        op, msg = await read_ws_message(r)
        if op != 2 or len(msg) < HEADER.size or msg[1] != KIND_RESPONSE:
            raise RuntimeError(f"no Response frame: opcode {op}, {msg[:60]!r}")
    elif kind == "nats":
        info = await r.readuntil(b"\r\n")
        if not info.startswith(b"INFO "):
            raise RuntimeError(f"no INFO: {info[:100]!r}")
        w.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await w.drain()
        pong = await r.readuntil(b"\r\n")
        if pong != b"PONG\r\n":
            raise RuntimeError(f"no PONG: {pong[:100]!r}")
    else:
        raise SystemExit(f"unknown kind {kind}")


async def main():
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    kind, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    path = sys.argv[5] if len(sys.argv) > 5 else "/"
    token = sys.argv[6] if len(sys.argv) > 6 else ""
    tls = None
    if kind == "https":
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    held = []

    async def one():
        async with gate:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), STEP_TIMEOUT_S)
            held.append(w)
            await asyncio.wait_for(exchange(kind, r, w, host, path, token), STEP_TIMEOUT_S)

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    except Exception as e:  # noqa: BLE001 - any failure ends the run with its reason
        print(f"failed after {len(held)} connections: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"held {len(held)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in held:
        w.close()
    await asyncio.sleep(0)
    print("closed", flush=True)


asyncio.run(main())
