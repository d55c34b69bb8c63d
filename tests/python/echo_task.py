#!/usr/bin/env python3
"""A fedbus echo task written from docs/PROTOCOL.md alone (no fedbus code is imported).

    python3 echo_task.py --router 127.0.0.1:8900 --token fbs1.... --app demo/echo --partitions 0-15

Opens a link to shard 0 of the router, reads the hello, registers, then opens a link to every
other shard the hello lists, and answers every Request frame with a Response frame:
STATUS 200, HEADER `python-task: yes`, the request's CONTENT_TYPE if it had one, and the
request's payload as the body. Each link reconnects on its own with a capped backoff.
On SIGTERM or SIGINT it stops gracefully (docs/PROTOCOL.md section 4, "Stopping"): it sends
`{"type":"draining"}` on every registered link, keeps answering what arrives until the router
answers `{"type":"drained"}`, then closes that link (1000); it exits 0 once every link is
closed, or after STOP_TIMEOUT_S without a router's `drained` (status 1).
Needs the `websockets` package (Debian: python3-websockets).
"""

import argparse
import asyncio
import json
import random
import signal
import struct
import sys

try:  # websockets >= 14: the new asyncio implementation
    from websockets.asyncio.client import connect as ws_connect

    HEADERS_KW = "additional_headers"
except ImportError:  # websockets 10 to 13 (Debian bookworm ships 10.4)
    from websockets.client import connect as ws_connect

    HEADERS_KW = "extra_headers"

# --- fedbus frames (docs/PROTOCOL.md section 5) -------------------------------------------
MAGIC = 0xFB
HEADER = struct.Struct(">BBBBIQII")  # magic, kind, flags, hops, partition, id, meta_len, payload_len
assert HEADER.size == 24

KIND_REQUEST, KIND_RESPONSE, KIND_REDIRECT, KIND_SECRET_PUSH = 1, 2, 3, 4
TAG_CONTENT_TYPE = 9
TAG_STATUS = 16
TAG_HEADER = 17

MAX_MESSAGE = 64 * 1024 * 1024
STOP_TIMEOUT_S = 10
DRAINING = json.dumps({"type": "draining"})


def decode_frame(msg):
    """Returns (kind, flags, hops, partition, request_id, [(tag, value)], payload)."""
    if len(msg) < HEADER.size:
        raise ValueError("frame shorter than its header")
    magic, kind, flags, hops, partition, rid, meta_len, payload_len = HEADER.unpack_from(msg, 0)
    if magic != MAGIC:
        raise ValueError("bad magic %#x" % magic)
    if HEADER.size + meta_len + payload_len != len(msg):
        raise ValueError("lengths do not match the message")
    meta, i, end = [], HEADER.size, HEADER.size + meta_len
    while i < end:
        if end - i < 3:
            raise ValueError("truncated metadata entry")
        tag = msg[i]
        (n,) = struct.unpack_from(">H", msg, i + 1)
        if i + 3 + n > end:
            raise ValueError("truncated metadata entry")
        meta.append((tag, bytes(msg[i + 3 : i + 3 + n])))
        i += 3 + n
    return kind, flags, hops, partition, rid, meta, memoryview(msg)[end:]


def meta_entry(tag, value):
    if isinstance(value, str):
        value = value.encode()
    return struct.pack(">BH", tag, len(value)) + value


def encode_frame(kind, flags, hops, partition, rid, meta, payload):
    return (
        HEADER.pack(MAGIC, kind, flags, hops, partition, rid, len(meta), len(payload))
        + meta
        + bytes(payload)
    )


def answer(request):
    kind, _flags, hops, partition, rid, meta, payload = decode_frame(request)
    if kind != KIND_REQUEST:
        return None
    out = meta_entry(TAG_STATUS, "200") + meta_entry(TAG_HEADER, "python-task: yes")
    for tag, value in meta:
        if tag == TAG_CONTENT_TYPE:
            out += meta_entry(TAG_CONTENT_TYPE, value)
            break
    # Answer with the same id; echo hops and partition as the doc recommends.
    return encode_frame(KIND_RESPONSE, 0, hops, partition, rid, out, payload)


# --- links (docs/PROTOCOL.md sections 1, 3, 4) --------------------------------------------
class Task:
    def __init__(self, args):
        self.token = args.token
        self.app = args.app
        self.role = args.role
        self.partitions = parse_partitions(args.partitions)
        # One instance id for every link of this process; below 2**53 so any JSON reader
        # keeps it exact.
        self.instance = random.getrandbits(53)
        self.started = set()
        # Registered links (addr -> websocket), and the stop: set on SIGTERM/SIGINT.
        self.registered = {}
        self.stopping = False
        self.all_closed = asyncio.Event()
        self.stop_requested = asyncio.Event()

    def stop(self):
        """Section 4, "Stopping": tell every router, then wait for each one's `drained`."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_requested.set()
        log("stopping: draining %d links" % len(self.registered))
        for ws in list(self.registered.values()):
            asyncio.get_running_loop().create_task(ws.send(DRAINING))
        self.check_closed()

    def check_closed(self):
        if self.stopping and not self.registered:
            self.all_closed.set()

    def start_link(self, addr):
        if addr not in self.started:
            self.started.add(addr)
            asyncio.get_running_loop().create_task(self.link_loop(addr))

    async def link_loop(self, addr):
        backoff = 0.05
        while not self.stopping:
            try:
                await self.link_once(addr)
                backoff = 0.05
            except Exception as e:  # noqa: BLE001 - a link retries whatever happened
                log("link %s: %s: %s" % (addr, type(e).__name__, e))
            finally:
                self.registered.pop(addr, None)
                self.check_closed()
            if self.stopping:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def link_once(self, addr):
        kwargs = {
            HEADERS_KW: {"Authorization": "Bearer " + self.token},
            "max_size": MAX_MESSAGE,
            "compression": None,  # the router negotiates no extension
            "ping_interval": None,  # the router pings us; the library pongs by itself
            "open_timeout": 5,
        }
        async with ws_connect("ws://%s/link" % addr, **kwargs) as ws:
            hello = json.loads(await ws.recv())
            if hello.get("type") != "hello":
                raise RuntimeError("expected hello, got %r" % hello)
            if self.stopping:  # the signal came while this link was opening: no registration
                await ws.close(code=1000)
                return
            await ws.send(
                json.dumps(
                    {
                        "type": "register",
                        "task": self.instance,
                        "app": self.app,
                        "role": self.role,
                        "partitions": self.partitions,
                    }
                )
            )
            self.registered[addr] = ws
            if self.stopping:  # registered while stopping: tell this router too
                await ws.send(DRAINING)
            # Links to the other shards; skip this link's own index, since shard 0 may have
            # been reached under another name than the one the hello lists.
            for k, other in enumerate(hello.get("internal", [])):
                if k != hello.get("shard"):
                    self.start_link(other)
            async for msg in ws:
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m.get("type") == "registered":
                        log("registered on %s shard %s" % (hello["router"], m.get("shard")))
                    elif m.get("type") == "drained":
                        # Every request the router routed here came before this: all answered.
                        await ws.close(code=1000)
                        return
                    continue
                reply = answer(msg)
                if reply is not None:
                    await ws.send(reply)


def parse_partitions(spec):
    out = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    if not out:
        raise SystemExit("no partitions in %r" % spec)
    return sorted(out)


def log(s):
    print("echo_task.py: " + s, file=sys.stderr, flush=True)


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", required=True, help="internal address of shard 0, HOST:PORT")
    p.add_argument("--token", required=True, help="service token (fbs1....)")
    p.add_argument("--app", default="demo/echo")
    p.add_argument("--role", default="main")
    p.add_argument("--partitions", default="0-15")
    args = p.parse_args()
    task = Task(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.stop)
    task.start_link(args.router)
    log("instance %d, app %s, first link %s" % (task.instance, task.app, args.router))
    await task.stop_requested.wait()
    try:
        await asyncio.wait_for(task.all_closed.wait(), STOP_TIMEOUT_S)
    except asyncio.TimeoutError:
        log("stop: a router did not answer drained within %d s" % STOP_TIMEOUT_S)
        return 1
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
