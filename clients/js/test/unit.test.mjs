// Unit tests of the client's pure parts (frames, backoff, URLs) and of its connection logic
// against a scripted fake WebSocket. Run: `node --test clients/js/test/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import vm from "node:vm";
import {
  encodeRequest,
  decodeFrame,
  responseFromFrame,
  backoffDelay,
  wsUrl,
  connect,
  Tag,
  Kind,
  HEADER_LEN,
} from "../fedbus.js";

const te = new TextEncoder();
const td = new TextDecoder();
const hex = (s) => Uint8Array.from(s.replace(/\s+/g, "").match(/../g).map((h) => parseInt(h, 16)));

// ---- frames ---------------------------------------------------------------------------------

test("encodeRequest writes the header, PATH, CONTENT_TYPE and payload byte by byte", () => {
  const got = encodeRequest(0x0102030405, "/api/a", te.encode("hi"), "text/plain");
  const want = hex(`
    fb 01 00 00  00 00 00 00  00 00 00 01 02 03 04 05  00 00 00 16  00 00 00 02
    18 00 06 2f 61 70 69 2f 61
    09 00 0a 74 65 78 74 2f 70 6c 61 69 6e
    68 69`);
  assert.deepEqual(got, want);
});

test("encodeRequest without a content type has PATH only", () => {
  const got = encodeRequest(7, "/api/x", new Uint8Array(0));
  assert.equal(got.length, HEADER_LEN + 3 + 6);
  const f = decodeFrame(got);
  assert.equal(f.kind, Kind.Request);
  assert.equal(f.requestId, 7);
  assert.deepEqual(f.meta.map((m) => m.tag), [Tag.PATH]);
  assert.equal(td.decode(f.meta[0].value), "/api/x");
});

test("encodeRequest carries METHOD unless it is POST", () => {
  const tags = (m) => decodeFrame(encodeRequest(1, "/api/x", new Uint8Array(0), "text/plain", m)).meta;
  const put = tags("PUT");
  assert.deepEqual(put.map((m) => m.tag), [Tag.PATH, Tag.METHOD, Tag.CONTENT_TYPE]);
  assert.equal(td.decode(put[1].value), "PUT");
  assert.deepEqual(tags("POST").map((m) => m.tag), [Tag.PATH, Tag.CONTENT_TYPE]);
  assert.deepEqual(tags(undefined).map((m) => m.tag), [Tag.PATH, Tag.CONTENT_TYPE]);
});

test("encodeRequest refuses ids that are not safe integers and oversized values", () => {
  assert.throws(() => encodeRequest(-1, "/api/x", new Uint8Array(0)), RangeError);
  assert.throws(() => encodeRequest(2 ** 53, "/api/x", new Uint8Array(0)), RangeError);
  assert.throws(() => encodeRequest(1, "/api/" + "x".repeat(70000), new Uint8Array(0)), RangeError);
});

// The Response of PROTOCOL.md section 9 (the Python echo task's answer).
const SECTION9_RESPONSE = hex(`
  fb 02 00 00 00 00 00 0a 00 00 00 00 00 00 00 01 00 00 00 26 00 00 00 05
  10 00 03 32 30 30
  11 00 10 70 79 74 68 6f 6e 2d 74 61 73 6b 3a 20 79 65 73
  09 00 0a 74 65 78 74 2f 70 6c 61 69 6e
  68 65 6c 6c 6f`);

test("decodeFrame + responseFromFrame read the worked example's Response", () => {
  const f = decodeFrame(SECTION9_RESPONSE.buffer.slice(0));
  assert.equal(f.kind, Kind.Response);
  assert.equal(f.partition, 10);
  assert.equal(f.requestId, 1);
  const r = responseFromFrame(f);
  assert.equal(r.status, 200);
  assert.equal(r.ok, true);
  assert.equal(r.error, null);
  assert.deepEqual(r.headers, { "python-task": "yes", "content-type": "text/plain" });
  assert.equal(r.text(), "hello");
});

test("decodeFrame refuses malformed frames", () => {
  const bad = (mut) => {
    const b = SECTION9_RESPONSE.slice();
    mut(b);
    return b;
  };
  assert.throws(() => decodeFrame(bad((b) => (b[0] = 0xfa))), /magic/);
  assert.throws(() => decodeFrame(bad((b) => (b[1] = 9))), /kind/);
  assert.throws(() => decodeFrame(SECTION9_RESPONSE.subarray(0, 60)), /length/);
  assert.throws(() => decodeFrame(SECTION9_RESPONSE.subarray(0, 10)), /shorter/);
  // meta_len 38 -> 39 and payload_len 5 -> 4: lengths add up, the last entry runs past meta.
  assert.throws(
    () =>
      decodeFrame(
        bad((b) => {
          b[19] = 0x27;
          b[23] = 4;
        }),
      ),
    /past the end/,
  );
});

function responseFrame(id, { status, error, headers = [], contentType, body = "" }) {
  const meta = [];
  const put = (tag, s) => {
    const v = te.encode(s);
    meta.push(tag, v.length >> 8, v.length & 255, ...v);
  };
  if (status !== undefined) put(Tag.STATUS, String(status));
  if (error) put(Tag.ERROR, error);
  for (const h of headers) put(Tag.HEADER, h);
  if (contentType) put(Tag.CONTENT_TYPE, contentType);
  const payload = te.encode(body);
  const out = new Uint8Array(HEADER_LEN + meta.length + payload.length);
  const dv = new DataView(out.buffer);
  out[0] = 0xfb;
  out[1] = Kind.Response;
  dv.setUint32(8, Math.floor(id / 2 ** 32));
  dv.setUint32(12, id >>> 0);
  dv.setUint32(16, meta.length);
  dv.setUint32(20, payload.length);
  out.set(meta, HEADER_LEN);
  out.set(payload, HEADER_LEN + meta.length);
  return out.buffer;
}

test("router-made errors become values with the code and message", () => {
  const r = responseFromFrame(
    decodeFrame(
      responseFrame(3, {
        status: 503,
        error: "no_live_task",
        headers: ["fedbus-shard: 0", "fedbus-partition: 2"],
        contentType: "application/json",
        body: '{"error":"no_live_task","message":"no task serves partition 2","status":503}',
      }),
    ),
  );
  assert.equal(r.ok, false);
  assert.equal(r.status, 503);
  assert.equal(r.error, "no_live_task");
  assert.equal(r.message, "no task serves partition 2");
  assert.equal(r.headers["fedbus-partition"], "2");
  assert.equal(r.requestId, 3);
});

test("a task's non-2xx answer is an error value http_<status>; no STATUS means 200", () => {
  const r = responseFromFrame(decodeFrame(responseFrame(1, { status: 404 })));
  assert.equal(r.error, "http_404");
  assert.equal(r.ok, false);
  const ok = responseFromFrame(decodeFrame(responseFrame(1, { headers: ["x: 1", "X: 2"] })));
  assert.equal(ok.status, 200);
  assert.equal(ok.headers.x, "1, 2");
  assert.equal(ok.json(), undefined);
});

// ---- backoff and URLs ------------------------------------------------------------------------

test("backoff doubles from initialMs to maxMs with jitter in [1-j, 1+j)", () => {
  const o = { initialMs: 50, maxMs: 5000, factor: 2, jitter: 0.5 };
  assert.deepEqual(
    [0, 1, 2, 3, 6, 7, 20].map((a) => backoffDelay(a, o, () => 0.5)),
    [50, 100, 200, 400, 3200, 5000, 5000],
  );
  assert.equal(backoffDelay(0, o, () => 0), 25);
  assert.equal(backoffDelay(20, o, () => 0.999999), 7500);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(3, o);
    assert.ok(d >= 200 && d <= 600, String(d));
  }
});

test("wsUrl maps http to ws, adds /api/ws and the access_token", () => {
  assert.equal(wsUrl("http://127.0.0.1:8800", "a.b.c"), "ws://127.0.0.1:8800/api/ws?access_token=a.b.c");
  assert.equal(wsUrl("https://h/prefix/", "t"), "wss://h/prefix/api/ws?access_token=t");
  assert.equal(wsUrl("ws://h:1/api/ws?x=1", "t"), "ws://h:1/api/ws?x=1&access_token=t");
  assert.throws(() => wsUrl("ftp://h", "t"), TypeError);
});

// ---- the client against a fake WebSocket ----------------------------------------------------

/** A scripted WebSocket: the test opens, answers and closes it. */
function fakeWebSocket() {
  const sockets = [];
  class FakeWS {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closedWith = null;
      sockets.push(this);
    }
    send(b) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(decodeFrame(b));
    }
    close(code, reason) {
      this.closedWith = [code, reason];
      this.readyState = 3;
    }
    // test side
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    answer(id, resp) {
      this.onmessage?.({ data: responseFrame(id, resp) });
    }
    drop(code = 1006, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  }
  return { FakeWS, sockets };
}

const tick = () => new Promise((r) => setImmediate(r));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(cond, what, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out waiting for " + what);
    await sleep(2);
  }
}

test("a null token opens an anonymous session; a request's method goes as METHOD", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://127.0.0.1:1", null, { WebSocket: FakeWS });
  const p = c.request("/api/l/d/o/a/auth/1/m/f", "x", {}, { method: "DELETE" });
  await until(() => sockets.length === 1, "the socket");
  assert.equal(sockets[0].url, "ws://127.0.0.1:1/api/ws");
  sockets[0].open();
  await until(() => sockets[0].sent.length === 1, "the request");
  const m = sockets[0].sent[0].meta.find((e) => e.tag === Tag.METHOD);
  assert.equal(td.decode(m.value), "DELETE");
  sockets[0].answer(sockets[0].sent[0].requestId, { status: 200, body: "ok" });
  assert.equal((await p).status, 200);
  const bad = await c.request("/api/l/d/o/a/s/1/m/f", "x", {}, { method: "TRACE" });
  assert.equal(bad.error, "bad_request");
  assert.equal(sockets[0].sent.length, 1, "a bad method is never sent");
  c.close();
  // A token function that yields nothing is an error, not an anonymous session.
  const f = fakeWebSocket();
  const d = connect("http://127.0.0.1:1", () => "", { WebSocket: f.FakeWS, whileDisconnected: "fail" });
  await d.ready(50);
  assert.equal(f.sockets.length, 0);
  d.close();
});

test("many requests on one socket, answered out of order, matched by id", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://127.0.0.1:1", "tok", { WebSocket: FakeWS });
  await tick();
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].url, "ws://127.0.0.1:1/api/ws?access_token=tok");
  const ps = [];
  for (let i = 0; i < 20; i++) ps.push(c.request(`/api/l/d/o/a/s/${i}/m/f`, "body" + i, { "Content-Type": "text/plain" }));
  await tick();
  assert.equal(sockets[0].sent.length, 0, "nothing is sent before the socket opens");
  sockets[0].open();
  assert.equal(sockets[0].sent.length, 20);
  assert.equal(c.inFlight, 20);
  const ids = sockets[0].sent.map((f) => f.requestId);
  assert.equal(new Set(ids).size, 20, "ids are unique");
  for (const f of [...sockets[0].sent].reverse()) {
    const ct = f.meta.find((m) => m.tag === Tag.CONTENT_TYPE);
    assert.equal(td.decode(ct.value), "text/plain");
    sockets[0].answer(f.requestId, { status: 200, body: td.decode(f.payload) });
  }
  const rs = await Promise.all(ps);
  rs.forEach((r, i) => {
    assert.equal(r.status, 200);
    assert.equal(r.text(), "body" + i);
  });
  assert.equal(c.inFlight, 0);
  c.close();
});

test("a drop resolves in-flight requests to `disconnected`, then reconnects with backoff", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const states = [];
  let tokens = 0;
  const c = connect("http://h:1", () => "tok" + ++tokens, {
    WebSocket: FakeWS,
    backoff: { initialMs: 20, jitter: 0 },
    onState: (s) => states.push(s),
  });
  await tick();
  sockets[0].open();
  const p1 = c.request("/api/a", "x");
  const p2 = c.request("/api/b", "y");
  await tick();
  sockets[0].drop(1006);
  const [r1, r2] = await Promise.all([p1, p2]);
  for (const r of [r1, r2]) {
    assert.equal(r.status, 0);
    assert.equal(r.error, "disconnected");
    assert.equal(r.transport, true);
  }
  assert.equal(c.state, "waiting");
  // Queued while waiting; sent after the reconnect, with a fresh token.
  const p3 = c.request("/api/c", "z");
  const t0 = Date.now();
  await until(() => sockets.length === 2, "reconnect");
  assert.ok(Date.now() - t0 >= 10, "waited for the backoff");
  assert.equal(sockets[1].url, "ws://h:1/api/ws?access_token=tok2");
  sockets[1].open();
  assert.equal(sockets[1].sent.length, 1);
  sockets[1].answer(sockets[1].sent[0].requestId, { body: "z" });
  assert.equal((await p3).text(), "z");
  assert.deepEqual(states, ["connecting", "open", "waiting", "connecting", "open"]);
  c.close();
});

test("failed connects back off exponentially; waiting requests fail with not_connected", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const delays = [];
  const c = connect("http://h:1", "t", {
    WebSocket: FakeWS,
    backoff: { initialMs: 5, factor: 2, jitter: 0 },
    connectTimeoutMs: 120,
    onState: (s, info) => s === "waiting" && delays.push(info.delay),
  });
  const p = c.request("/api/a", "x");
  for (let i = 0; i < 4; i++) {
    await until(() => sockets.length === i + 1, "attempt " + i);
    sockets[i].drop(1006);
  }
  assert.deepEqual(delays, [5, 10, 20, 40]);
  const r = await p;
  assert.equal(r.error, "not_connected");
  assert.equal(r.requestId, null);
  assert.equal(c._queue.length, 0, "a request that gave up leaves the queue");
  assert.equal(await c.ready(10), false);
  c.close();
});

test("whileDisconnected: fail resolves at once when the socket is not open", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, whileDisconnected: "fail" });
  const r = await c.request("/api/a", "x");
  assert.equal(r.error, "not_connected");
  await tick();
  sockets[0].open();
  assert.equal(await c.ready(), true);
  const p = c.request("/api/a", "x");
  sockets[0].answer(sockets[0].sent[0].requestId, { status: 201 });
  assert.equal((await p).status, 201);
  c.close();
});

test("close() resolves everything to `closed` and stops reconnecting", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, backoff: { initialMs: 1, jitter: 0 } });
  await tick();
  sockets[0].open();
  const p = c.request("/api/a", "x");
  sockets[0].readyState = 0; // not open: the next two wait in the queue
  c.state = "connecting";
  const q = [c.request("/api/b", "y"), c.request("/api/c", "z")];
  c.close();
  assert.deepEqual(sockets[0].closedWith, [1000, "client closed"]);
  assert.equal((await p).error, "closed");
  assert.deepEqual((await Promise.all(q)).map((r) => r.error), ["closed", "closed"]);
  assert.equal((await c.request("/api/a", "x")).error, "closed");
  await sleep(20);
  assert.equal(sockets.length, 1, "no reconnect after close()");
  assert.equal(c.state, "closed");
});

test("an idle close (1001) reconnects only when the next request comes", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, backoff: { initialMs: 1, jitter: 0 } });
  await tick();
  sockets[0].open();
  sockets[0].drop(1001, "idle");
  assert.equal(c.state, "idle");
  await sleep(20);
  assert.equal(sockets.length, 1);
  const p = c.request("/api/a", "x");
  await until(() => sockets.length === 2, "lazy reconnect");
  sockets[1].open();
  sockets[1].answer(sockets[1].sent[0].requestId, { body: "ok" });
  assert.equal((await p).text(), "ok");
  c.close();
});

test("request timeout; a late answer is ignored", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS });
  await tick();
  sockets[0].open();
  const p = c.request("/api/a", "x", {}, { timeoutMs: 20 });
  const r = await p;
  assert.equal(r.error, "timeout");
  assert.equal(r.requestId, sockets[0].sent[0].requestId, "a sent request's timeout carries its id");
  assert.equal(c.inFlight, 1, "the router still owes the answer");
  sockets[0].answer(sockets[0].sent[0].requestId, { body: "late" }); // no throw, not delivered
  assert.equal(c.inFlight, 0);
  assert.equal((await p).error, "timeout");
  c.close();
});

test("a timed-out request keeps its maxInFlight slot until the router answers it or the socket closes", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, maxInFlight: 2, backoff: { initialMs: 1, jitter: 0 } });
  await tick();
  sockets[0].open();
  const t = [c.request("/api/a", "t0", {}, { timeoutMs: 15 }), c.request("/api/a", "t1", {}, { timeoutMs: 15 })];
  const q = [c.request("/api/a", "q0"), c.request("/api/a", "q1"), c.request("/api/a", "q2")];
  assert.equal(sockets[0].sent.length, 2);
  assert.deepEqual((await Promise.all(t)).map((r) => r.error), ["timeout", "timeout"]);
  await sleep(10);
  assert.equal(sockets[0].sent.length, 2, "no request sent while the router still counts the timed-out two");
  assert.equal(c.inFlight, 2);
  // The first late answer (a 504, say) frees one slot: q0 goes; the answer reaches nobody.
  sockets[0].answer(sockets[0].sent[0].requestId, { status: 504, body: "late" });
  assert.equal(sockets[0].sent.length, 3);
  assert.equal(td.decode(sockets[0].sent[2].payload), "q0");
  sockets[0].answer(sockets[0].sent[2].requestId, { body: "a0" });
  assert.equal((await q[0]).text(), "a0");
  assert.equal(sockets[0].sent.length, 4);
  assert.equal(td.decode(sockets[0].sent[3].payload), "q1");
  assert.equal(c.inFlight, 2, "t1 (timed out) and q1");
  // A drop frees every slot: the router forgets a closed session's requests.
  sockets[0].drop(1006);
  assert.equal((await q[1]).error, "disconnected");
  assert.equal(c.inFlight, 0);
  await until(() => sockets.length === 2, "reconnect");
  sockets[1].open();
  assert.equal(sockets[1].sent.length, 1);
  assert.equal(td.decode(sockets[1].sent[0].payload), "q2");
  sockets[1].answer(sockets[1].sent[0].requestId, { body: "a2" });
  assert.equal((await q[2]).text(), "a2");
  // The old socket's late answer is no one's.
  sockets[0].answer(sockets[0].sent[1].requestId, { body: "late" });
  assert.deepEqual((await Promise.all(t)).map((r) => r.error), ["timeout", "timeout"]);
  c.close();
});

test("a timed-out request holds its slot at most lateAnswerMs after it was sent", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, maxInFlight: 1, lateAnswerMs: 80 });
  await tick();
  sockets[0].open();
  const t0 = Date.now();
  const a = c.request("/api/a", "a", {}, { timeoutMs: 10 });
  const b = c.request("/api/a", "b");
  assert.equal(c._inflight.get(sockets[0].sent[0].requestId).body, null, "a sent entry keeps no body");
  assert.equal((await a).error, "timeout");
  assert.equal(c.inFlight, 1, "held: the router may still answer");
  assert.equal(sockets[0].sent.length, 1);
  // Something arrives on the socket meanwhile (not an answer of ours): the socket is alive, so
  // when lateAnswerMs passes the slot is freed and b goes on the same socket.
  sockets[0].answer(999999, { body: "someone else's" });
  await until(() => sockets[0].sent.length === 2, "b sent once the slot is released", 1000);
  assert.ok(Date.now() - t0 >= 75, "released no earlier than lateAnswerMs after the send");
  assert.equal(td.decode(sockets[0].sent[1].payload), "b");
  assert.equal(c.inFlight, 1, "b only");
  assert.deepEqual(sockets[0].closedWith, null, "the socket stays");
  sockets[0].answer(sockets[0].sent[0].requestId, { body: "late" }); // no one's now, ignored
  assert.equal(c.inFlight, 1);
  sockets[0].answer(sockets[0].sent[1].requestId, { body: "B" });
  assert.equal((await b).text(), "B");
  assert.equal(c.inFlight, 0);
  // A timeout longer than lateAnswerMs frees the slot at once (the answer is overdue already).
  const d = c.request("/api/a", "d", {}, { timeoutMs: 100 });
  sockets[0].answer(999998, {}); // alive
  assert.equal((await d).error, "timeout");
  assert.equal(c.inFlight, 0);
  assert.equal(sockets.length, 1);
  c.close();
});

test("a silent socket (every request timed out, nothing received for lateAnswerMs) is dropped and reopened", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const states = [];
  const c = connect("http://h:1", "t", {
    WebSocket: FakeWS,
    maxInFlight: 2,
    lateAnswerMs: 60,
    backoff: { initialMs: 5, jitter: 0 },
    onState: (s, info) => states.push([s, info.code]),
  });
  await tick();
  sockets[0].open();
  // Two requests time out on a socket that died without a close event; three wait for a slot.
  const t = [c.request("/api/a", "t0", {}, { timeoutMs: 10 }), c.request("/api/a", "t1", {}, { timeoutMs: 20 })];
  const q = [c.request("/api/a", "q0"), c.request("/api/a", "q1"), c.request("/api/a", "q2", {}, { timeoutMs: 0 })];
  assert.deepEqual((await Promise.all(t)).map((r) => r.error), ["timeout", "timeout"]);
  assert.equal(c.inFlight, 2);
  assert.equal(sockets[0].sent.length, 2, "every slot held");
  // lateAnswerMs after t0's send, nothing at all came: the client drops the socket itself.
  await until(() => sockets[0].closedWith !== null, "the silent socket dropped", 1000);
  assert.deepEqual(sockets[0].closedWith, [4002, "no answers"]);
  assert.equal(sockets[0].sent.length, 2, "nothing more went on the dead socket");
  await until(() => sockets.length === 2, "a new socket", 1000);
  sockets[1].open();
  assert.equal(sockets[1].sent.length, 2, "the queue goes on the new socket");
  assert.deepEqual(sockets[1].sent.map((f) => td.decode(f.payload)), ["q0", "q1"]);
  for (const f of sockets[1].sent) sockets[1].answer(f.requestId, { body: td.decode(f.payload).toUpperCase() });
  assert.deepEqual((await Promise.all(q.slice(0, 2))).map((r) => r.text()), ["Q0", "Q1"]);
  assert.equal(td.decode(sockets[1].sent[2].payload), "q2");
  // A request without a timeout keeps the socket, however quiet: no drop.
  await sleep(100);
  assert.equal(sockets[1].closedWith, null);
  assert.equal(sockets.length, 2);
  sockets[1].answer(sockets[1].sent[2].requestId, { body: "Q2" });
  assert.equal((await q[2]).text(), "Q2");
  assert.deepEqual(
    states.map(([s, code]) => (code ? s + " " + code : s)),
    ["connecting", "open", "waiting 4002", "connecting", "open"],
  );
  assert.deepEqual((await Promise.all(t)).map((r) => r.error), ["timeout", "timeout"], "resolved once, to timeout");
  c.close();
});

test("a quiet socket is not dropped while a request in flight is still within its timeout", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, lateAnswerMs: 30 });
  await tick();
  sockets[0].open();
  const a = c.request("/api/a", "a", {}, { timeoutMs: 5 });
  const b = c.request("/api/a", "b", {}, { timeoutMs: 200 });
  assert.equal((await a).error, "timeout");
  await sleep(60); // a's lateAnswerMs passed with nothing received, but b is still waiting
  assert.equal(sockets[0].closedWith, null);
  assert.equal(c.inFlight, 1, "a released, b in flight");
  sockets[0].answer(sockets[0].sent[1].requestId, { body: "B" });
  assert.equal((await b).text(), "B");
  c.close();
});

test("a request that times out while still queued just leaves the queue", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, maxInFlight: 1 });
  await tick();
  sockets[0].open();
  const a = c.request("/api/a", "a");
  const b = c.request("/api/a", "b", {}, { timeoutMs: 10 });
  const rb = await b;
  assert.equal(rb.error, "timeout");
  assert.equal(rb.requestId, null, "never sent");
  assert.equal(c._queue.length, 0);
  sockets[0].answer(sockets[0].sent[0].requestId, { body: "A" });
  assert.equal((await a).text(), "A");
  assert.equal(sockets[0].sent.length, 1, "b was never sent");
  assert.equal(c.inFlight, 0);
  c.close();
});

test("bad requests are values, never sent", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS });
  await tick();
  sockets[0].open();
  assert.equal((await c.request("/nope", "x")).error, "bad_request");
  assert.equal((await c.request("/api/a", "x", { authorization: "x" })).error, "bad_request");
  assert.equal((await c.request("/api/a", 42)).error, "bad_request");
  assert.equal(sockets[0].sent.length, 0);
  const p = c.request("/api/a", { a: 1 });
  const f = sockets[0].sent[0];
  assert.equal(td.decode(f.payload), '{"a":1}');
  assert.equal(td.decode(f.meta.find((m) => m.tag === Tag.CONTENT_TYPE).value), "application/json");
  sockets[0].answer(f.requestId, { body: '{"a":1}', contentType: "application/json" });
  assert.deepEqual((await p).json(), { a: 1 });
  c.close();
});

test("only plain objects and arrays go as JSON; a Blob, Map, Date, ... body resolves to bad_request, unsent", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS });
  await tick();
  sockets[0].open();
  class Point {
    constructor() {
      this.x = 1;
    }
  }
  const refused = {
    number: 42,
    boolean: true,
    bigint: 1n,
    Blob: new Blob(["blob"]),
    URLSearchParams: new URLSearchParams("a=1"),
    Map: new Map([["a", 1]]),
    Set: new Set([1]),
    Date: new Date(0),
    RegExp: /x/,
    Promise: Promise.resolve(1),
    "class instance": new Point(),
    "boxed string": new String("x"),
  };
  if (typeof FormData === "function") refused.FormData = new FormData();
  if (typeof File === "function") refused.File = new File(["f"], "f.txt");
  for (const [what, body] of Object.entries(refused)) {
    const p = c.request("/api/a", body);
    assert.ok(p instanceof Promise);
    const r = await p;
    assert.equal(r.status, 0, what);
    assert.equal(r.transport, true, what);
    assert.equal(r.error, "bad_request", what);
    assert.equal(r.requestId, null, what);
    assert.match(r.message, /body must be/, what);
  }
  // A cyclic object cannot be JSON: bad_request too.
  const cyc = {};
  cyc.self = cyc;
  assert.equal((await c.request("/api/a", cyc)).error, "bad_request");
  assert.equal(sockets[0].sent.length, 0, "none of them was sent");
  assert.equal(c.inFlight, 0);
  // JSON: a plain object, one without a prototype, one of another realm, an array.
  const bare = Object.create(null);
  bare.b = 2;
  const jsonBodies = [
    [{ a: 1 }, '{"a":1}'],
    [bare, '{"b":2}'],
    [vm.runInNewContext("({ c: 3 })"), '{"c":3}'],
    [[1, "x"], '[1,"x"]'],
    [vm.runInNewContext("[4]"), "[4]"],
  ];
  // An ArrayBuffer of another realm is bytes, not JSON.
  {
    const p = c.request("/api/a", vm.runInNewContext("new Uint8Array([7, 8]).buffer"));
    const f = sockets[0].sent.at(-1);
    assert.deepEqual(Array.from(f.payload), [7, 8]);
    assert.equal(f.meta.find((m) => m.tag === Tag.CONTENT_TYPE), undefined);
    sockets[0].answer(f.requestId, { body: "ok" });
    await p;
  }
  for (const [body, want] of jsonBodies) {
    const p = c.request("/api/a", body);
    const f = sockets[0].sent.at(-1);
    assert.equal(td.decode(f.payload), want);
    assert.equal(td.decode(f.meta.find((m) => m.tag === Tag.CONTENT_TYPE).value), "application/json");
    sockets[0].answer(f.requestId, { body: "ok" });
    assert.equal((await p).status, 200);
  }
  // A content type given in headers wins over application/json.
  const p = c.request("/api/a", { a: 1 }, { "content-type": "application/x-thing+json" });
  const f = sockets[0].sent.at(-1);
  assert.equal(td.decode(f.meta.find((m) => m.tag === Tag.CONTENT_TYPE).value), "application/x-thing+json");
  sockets[0].answer(f.requestId, { body: "ok" });
  await p;
  c.close();
});

test("at most maxInFlight requests are on the wire; the rest wait their turn", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, maxInFlight: 3 });
  await tick();
  sockets[0].open();
  const ps = [];
  for (let i = 0; i < 7; i++) ps.push(c.request("/api/a", String(i)));
  assert.equal(sockets[0].sent.length, 3);
  for (let k = 0; k < 7; k++) {
    const f = sockets[0].sent[k];
    sockets[0].answer(f.requestId, { body: td.decode(f.payload) });
    assert.ok(c.inFlight <= 3);
  }
  assert.deepEqual((await Promise.all(ps)).map((r) => r.text()), ["0", "1", "2", "3", "4", "5", "6"]);
  c.close();
});

test("a malformed frame from the router drops the socket and fails in-flight requests", async () => {
  const { FakeWS, sockets } = fakeWebSocket();
  const c = connect("http://h:1", "t", { WebSocket: FakeWS, backoff: { initialMs: 1000 } });
  await tick();
  sockets[0].open();
  const p = c.request("/api/a", "x");
  sockets[0].onmessage({ data: new Uint8Array([1, 2, 3]).buffer });
  const r = await p;
  assert.equal(r.error, "disconnected");
  assert.match(r.message, /bad frame/);
  assert.equal(sockets[0].closedWith[0], 4000);
  c.close();
});
