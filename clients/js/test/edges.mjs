#!/usr/bin/env node
// Edge probe of the JavaScript client and the router's /api/ws + CORS behaviour, in headless
// Chromium against real routers, written from the docs (README.md, docs/PROTOCOL.md section 8,
// docs/TUNING.md, clients/js/README.md, fedbus.d.ts). Each check prints PASS or FAIL with what
// it saw; the exit code is 1 when any failed.
//
//   node clients/js/test/edges.mjs      (or clients/js/test/edges.sh)
//
// Env: FEDBUS_BIN (default bin/fedbus, else target/release/fedbus), CHROMIUM (/usr/bin/chromium),
// EDGES_TIMEOUT_MS (whole run, default 180000), EDGES_ONLY (regexp of groups to run).
//
// Addresses: routers on 127.77.0.1 (A: most checks), 127.77.0.4 (R: restarts, fixed ports),
// 127.77.0.5 (B: idle timeout), 127.77.0.6 (C: client pings, an app allowing "*"); pages on
// 127.77.0.2 (allowed origin) and 127.77.0.3 (not allowed).
import { spawn, execFileSync } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CLIENT_DIR = path.resolve(HERE, "..");
const ROOT = path.resolve(CLIENT_DIR, "../..");
const BIN = process.env.FEDBUS_BIN
  ? path.resolve(process.env.FEDBUS_BIN)
  : fs.existsSync(path.join(ROOT, "bin/fedbus"))
    ? path.join(ROOT, "bin/fedbus")
    : path.join(ROOT, "target/release/fedbus");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_MS = Number(process.env.EDGES_TIMEOUT_MS || 180000);
const ONLY = process.env.EDGES_ONLY ? new RegExp(process.env.EDGES_ONLY) : null;
const T0 = Date.now();

const HOST_A = "127.77.0.1";
const HOST_PAGE_OK = "127.77.0.2";
const HOST_PAGE_BAD = "127.77.0.3";
const HOST_R = "127.77.0.4";
const HOST_B = "127.77.0.5";
const HOST_C = "127.77.0.6";

const SLOW_MS = 700; // demo/echo partitions 0-7 on router A answer after this
const A_REQUEST_TIMEOUT_MS = 1500;
const A_MAX_BODY = 262144; // 256 KiB: /api/ws messages up to 320 KiB
const ANON_MAX_BODY = 65536; // default max_anonymous_body_bytes: anonymous messages up to 128 KiB
const IDLE_MS = 1500; // routers B and C

// ---- results ---------------------------------------------------------------------------------

const rows = [];
function check(group, name, ok, detail) {
  ok = Boolean(ok);
  rows.push({ group, name, ok, detail: String(detail ?? "") });
  const secs = ((Date.now() - T0) / 1000).toFixed(1);
  console.log(`${ok ? "PASS" : "FAIL"} [${group}] ${name}${detail ? " -- " + detail : ""} (${secs}s)`);
  return ok;
}
const short = (v, n = 600) => {
  const s = typeof v === "string" ? v : JSON.stringify(v);
  return s && s.length > n ? s.slice(0, n) + "…" : s;
};

// ---- processes and cleanup -------------------------------------------------------------------

const children = new Set();
let browser = null;
let home = null;
const servers = [];

function cleanup() {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      // gone
    }
  }
  children.clear();
  const bp = browser?.process();
  if (bp?.pid) {
    try {
      process.kill(-bp.pid, "SIGKILL");
    } catch {
      try {
        bp.kill("SIGKILL");
      } catch {
        // gone
      }
    }
  }
  for (const s of servers) s.closeAllConnections?.(), s.close();
  if (home && !process.env.EDGES_KEEP) fs.rmSync(home, { recursive: true, force: true });
  home = null;
}
process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => {
    console.error(`edges: ${sig}`);
    cleanup();
    process.exit(1);
  });
}
const overall = setTimeout(() => {
  const failed = rows.filter((r) => !r.ok).length;
  console.error(`edges: over the ${TOTAL_MS} ms limit (${rows.length - failed} passed, ${failed} failed before it)`);
  printLogs();
  process.exit(1);
}, TOTAL_MS);
overall.unref();

function logTail(file, n = 30) {
  try {
    return fs.readFileSync(file, "utf8").split("\n").slice(-n).join("\n");
  } catch {
    return "";
  }
}
function printLogs() {
  if (!home) return;
  for (const f of fs.readdirSync(home).filter((f) => f.endsWith(".log"))) {
    console.error(`---- last lines of ${f} ----\n${logTail(path.join(home, f), 15)}`);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(cond, what, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}
function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, rej) => (t = setTimeout(() => rej(new Error(`${what}: no result within ${ms} ms`)), ms))),
  ]);
}

// ---- routers and tasks -----------------------------------------------------------------------

const keyring = () => path.join(home, "keys");
function fedbus(args) {
  return execFileSync(BIN, args, { env: { ...process.env, FEDBUS_HOME: home }, stdio: ["ignore", "pipe", "pipe"] })
    .toString()
    .trim();
}
const clientToken = (app, ttl = "1h", sub = "alice") => fedbus(["token", "client", "--app", app, "--sub", sub, "--ttl", ttl, "--keyring", keyring()]);

/** apps: [{name, partitions, origins?: [..]}] */
function routerConfig({ host, api = 0, internal = 0, apps, limits = {} }) {
  let c = `region = "local"
cluster = "dev"
keyring = ${JSON.stringify(keyring())}
[listen]
api = "${host}:${api}"
internal = "${host}:${internal}"
admin = "${host}:0"
[tuning]
shard_cores = [0]
pin = false
[limits]
`;
  for (const [k, v] of Object.entries(limits)) c += `${k} = ${v}\n`;
  for (const a of apps) {
    c += `[[apps]]\nname = "${a.name}"\npartitions = ${a.partitions}\n`;
    if (a.origins) c += `[apps.cors]\nallowed_origins = ${JSON.stringify(a.origins)}\n`;
  }
  return c;
}

/** Starts `fedbus run`; resolves to the parsed ready line plus {child, log, tag}. */
async function startRouter(cfgText, tag) {
  const cfg = path.join(home, `router-${tag}.toml`);
  fs.writeFileSync(cfg, cfgText);
  const log = path.join(home, `router-${tag}.log`);
  const child = spawn(BIN, ["run", "--config", cfg], {
    env: { ...process.env, FEDBUS_HOME: home, FEDBUS_LOG: "info" },
    stdio: ["ignore", "pipe", fs.openSync(log, "a")],
  });
  children.add(child);
  const lines = readline.createInterface({ input: child.stdout });
  const ready = new Promise((resolve) => {
    lines.on("line", (l) => {
      if (l.startsWith("fedbus-ready ")) resolve(JSON.parse(l.slice("fedbus-ready ".length)));
    });
    child.on("exit", (code) => resolve({ error: `exited with ${code}: ${logTail(log, 5)}` }));
  });
  const r = await withTimeout(ready, 10000, `router ${tag} ready line`);
  if (r.error) throw new Error(`router ${tag}: ${r.error}`);
  child.on("exit", () => children.delete(child));
  return { ...r, child, log, tag };
}

function startTask(router, app, partitions, extra = [], tag = "") {
  const log = path.join(home, `task-${router.tag}-${app.replace("/", "-")}${tag}.log`);
  const child = spawn(
    BIN,
    ["task", "echo", "--app", app, "--partitions", partitions, "--router", router.internal[0], "--keyring", keyring(), ...extra],
    { env: { ...process.env, FEDBUS_HOME: home, FEDBUS_LOG: "info" }, stdio: ["ignore", "ignore", fs.openSync(log, "a")] },
  );
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

/** An HTTP request from node: {status, headers, body} or {error}. */
function httpRequest(method, url, headers = {}, body = "", timeoutMs = 5000) {
  return new Promise((resolve) => {
    const req = http.request(url, { method, headers, agent: false, timeout: timeoutMs }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", (e) => resolve({ error: e.message }));
    req.end(body);
  });
}

/** Waits until an HTTP POST to app/wsid on the router is answered 200 by its own partition's task. */
async function waitRouted(api, app, wsid, token, ms = 15000) {
  const url = `http://${api}/api/local/dev/${app}/api/${wsid}/sys/echo`;
  // 200 from the partition's own task (not from an emergency partition standing in for it).
  await waitFor(async () => {
    const r = await httpRequest("POST", url, { authorization: `Bearer ${token}` }, "probe", 6000);
    return r.status === 200 && !r.headers["fedbus-emergency"];
  }, `${app} wsid ${wsid} routed on ${api}`, ms);
}

/** The status line, headers and body of an /api/ws upgrade. */
function upgradeHead(api, { token, origin, host } = {}) {
  return new Promise((resolve) => {
    const [h, port] = [api.slice(0, api.lastIndexOf(":")), Number(api.slice(api.lastIndexOf(":") + 1))];
    const s = net.connect(port, h);
    let buf = "";
    const done = (v) => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(5000, () => done({ error: "timeout", head: buf }));
    s.on("error", (e) => done({ error: e.message, head: buf }));
    s.on("data", (d) => {
      buf += d.toString("latin1");
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buf.slice(0, end);
      const status = Number(buf.split(" ")[1]);
      const cl = /content-length:\s*(\d+)/i.exec(head);
      const rest = buf.slice(end + 4);
      if (status !== 101 && cl && rest.length < Number(cl[1])) return; // wait for the body
      done({ head, status, rest });
    });
    s.on("connect", () => {
      s.write(
        `GET /api/ws${token ? "?access_token=" + token : ""} HTTP/1.1\r\nHost: ${host || api}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
          `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n` +
          (origin ? `Origin: ${origin}\r\n` : "") +
          "\r\n",
      );
    });
  });
}
const jsonOr = (s) => {
  try {
    return JSON.parse(s);
  } catch {
    return {};
  }
};

/** A free port on host (bound and released at once). */
async function freePort(host) {
  const s = net.createServer();
  s.listen(0, host);
  await once(s, "listening");
  const p = s.address().port;
  s.close();
  await once(s, "close");
  return p;
}

// ---- pages -----------------------------------------------------------------------------------

const PAGE = `<!doctype html><meta charset="utf-8"><title>fedbus edges</title>
<script type="module">
import * as fb from "/fedbus.js";
window.fb = fb;
window.sleep = (ms) => new Promise((r) => setTimeout(r, ms));
window.until = async (cond, ms) => { const end = Date.now() + ms; while (!cond()) { if (Date.now() > end) return false; await sleep(10); } return true; };
window.plain = (r) => r && ({ status: r.status, ok: r.ok, error: r.error, message: r.message, headers: r.headers,
  body: r.text(), len: r.body.length, requestId: r.requestId, transport: r.transport });
window.sockets = [];
window.Counting = class extends WebSocket { constructor(u, p) { super(u, p); window.sockets.push(this); } };
window.mk = (url, token, opts = {}) => {
  const states = [];
  const c = fb.connect(url, token, { WebSocket: window.Counting, ...opts, onState: (s, i) => states.push([s, i && i.code, i && i.delay, Date.now()]) });
  c._states = states;
  return c;
};
window.edgesReady = true;
</script><body>fedbus edges</body>`;

async function pageServer(host) {
  const s = http.createServer((req, res) => {
    const p = new URL(req.url, "http://x").pathname;
    if (p === "/") res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" }).end(PAGE);
    else if (p === "/fedbus.js")
      res.writeHead(200, { "content-type": "text/javascript; charset=utf-8", "cache-control": "no-store" }).end(fs.readFileSync(path.join(CLIENT_DIR, "fedbus.js")));
    else res.writeHead(404).end();
  });
  servers.push(s);
  s.listen(0, host);
  await once(s, "listening");
  return `http://${host}:${s.address().port}`;
}

// ---- the probe -------------------------------------------------------------------------------

const pick = (r) => {
  if (!r) return r;
  const o = { status: r.status, error: r.error };
  if (r.message) o.message = r.message;
  if (r.threw) o.threw = r.threw;
  return o;
};
const want = (g) => !ONLY || ONLY.test(g);

async function main() {
  if (!fs.existsSync(BIN)) throw new Error(`no router binary at ${BIN}`);
  const { default: puppeteer } = await import("puppeteer-core");
  home = fs.mkdtempSync(path.join(os.tmpdir(), "fedbus-edges-"));
  console.log(`router binary ${BIN}; home ${home}`);

  const OK = await pageServer(HOST_PAGE_OK);
  const BAD = await pageServer(HOST_PAGE_BAD);
  fedbus(["keys", "init", "--keyring", keyring(), ...["demo/echo", "demo/other", "demo/slow", "demo/down", "demo/lost", "demo/ghost", "demo/star"].flatMap((a) => ["--app", a])]);

  // Router A.
  const A = await startRouter(
    routerConfig({
      host: HOST_A,
      apps: [
        { name: "demo/echo", partitions: 16, origins: [OK] },
        { name: "demo/other", partitions: 4 },
        { name: "demo/slow", partitions: 4, origins: [OK] },
        { name: "demo/down", partitions: 4, origins: [OK] },
        { name: "demo/lost", partitions: 4, origins: [OK] },
      ],
      limits: { request_timeout_ms: A_REQUEST_TIMEOUT_MS, max_body_bytes: A_MAX_BODY, task_eject_after_timeouts: 0 },
    }),
    "A",
  );
  startTask(A, "demo/echo", "0-7", ["--delay-ms", String(SLOW_MS)], "-slow");
  startTask(A, "demo/echo", "8-15", [], "-fast");
  startTask(A, "demo/echo", "0-15", ["--role", "auth"], "-auth");
  startTask(A, "demo/slow", "0-3", ["--delay-ms", "3000"]);
  startTask(A, "demo/other", "0-3");
  let lostTask = startTask(A, "demo/lost", "0-3", ["--delay-ms", "10000"]);
  // Router B: idle timeout.
  const B = await startRouter(
    routerConfig({ host: HOST_B, apps: [{ name: "demo/echo", partitions: 16, origins: [OK] }], limits: { idle_timeout_ms: IDLE_MS } }),
    "B",
  );
  startTask(B, "demo/echo", "0-15");
  // Router C: client pings, an app allowing any origin.
  const C = await startRouter(
    routerConfig({
      host: HOST_C,
      apps: [
        { name: "demo/echo", partitions: 16, origins: [OK] },
        { name: "demo/star", partitions: 4, origins: ["*"] },
      ],
      limits: { idle_timeout_ms: IDLE_MS, client_ping_interval_ms: 400 },
    }),
    "C",
  );
  startTask(C, "demo/echo", "0-15");
  startTask(C, "demo/star", "0-3");
  // Router R: restarted on fixed ports.
  const rApiPort = await freePort(HOST_R);
  const rIntPort = await freePort(HOST_R);
  const rCfg = routerConfig({ host: HOST_R, api: rApiPort, internal: rIntPort, apps: [{ name: "demo/echo", partitions: 16, origins: [OK] }], limits: {} });
  let R = await startRouter(rCfg, "R");
  startTask(R, "demo/echo", "0-7", ["--delay-ms", "1000"], "-slow");
  startTask(R, "demo/echo", "8-15", [], "-fast");

  const tok = {
    echo: clientToken("demo/echo"),
    other: clientToken("demo/other"),
    slow: clientToken("demo/slow"),
    down: clientToken("demo/down"),
    lost: clientToken("demo/lost"),
    ghost: clientToken("demo/ghost"),
    star: clientToken("demo/star"),
  };
  await Promise.all([
    waitRouted(A.api, "demo/echo", 0, tok.echo),
    waitRouted(A.api, "demo/echo", 8, tok.echo),
    waitRouted(A.api, "demo/other", 0, tok.other),
    waitFor(async () => (await httpRequest("POST", `http://${A.api}/api/local/dev/demo/echo/auth/8/sys/echo`, {}, "probe")).status === 200, "auth role routed"),
    waitRouted(B.api, "demo/echo", 0, tok.echo),
    waitRouted(C.api, "demo/echo", 0, tok.echo),
    waitRouted(C.api, "demo/star", 0, tok.star),
    waitRouted(R.api, "demo/echo", 0, tok.echo),
    waitRouted(R.api, "demo/echo", 8, tok.echo),
    waitFor(async () => {
      const r = await httpRequest("POST", `http://${A.api}/api/local/dev/demo/slow/api/0/sys/echo`, { authorization: `Bearer ${tok.slow}` }, "p", 300);
      return r.error === "timeout";
    }, "demo/slow routed"),
    waitFor(async () => {
      const r = await httpRequest("POST", `http://${A.api}/api/local/dev/demo/lost/api/0/sys/echo`, { authorization: `Bearer ${tok.lost}` }, "p", 300);
      return r.error === "timeout";
    }, "demo/lost routed"),
  ]);
  const api = (r) => `http://${r.api}`;
  const apiA = api(A);
  console.log(`routers A ${A.api} B ${B.api} C ${C.api} R ${R.api}; pages ${OK} (allowed) ${BAD} (not allowed); setup ${((Date.now() - T0) / 1000).toFixed(1)}s`);

  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"],
    timeout: 15000,
    userDataDir: path.join(home, "chromium-profile"),
  });
  const open = async (origin) => {
    const page = await browser.newPage();
    page.on("pageerror", (e) => console.error(`page error (${origin}): ${e.message}`));
    await page.goto(origin + "/", { waitUntil: "load", timeout: 10000 });
    await page.waitForFunction("window.edgesReady === true", { timeout: 5000 });
    return page;
  };
  const P = await open(OK);
  const Q = await open(BAD);
  const ev = (page, fn, ...args) => withTimeout(page.evaluate(fn, ...args), 30000, "page.evaluate");
  // Runs one group; an exception in it is a failed check, the other groups still run.
  const group = async (g, fn) => {
    if (!want(g)) return;
    try {
      await fn(g);
    } catch (e) {
      check(g, "group ran to the end", false, e.stack || String(e));
    }
  };

  // ------------------------------------------------------------------------------------------
  await group("ws basics", async (g) => {
    const r = await ev(P, async (url, token) => {
      const c = mk(url, token);
      const ready = await c.ready(5000);
      const res = await c.request("/api/local/dev/demo/echo/api/42/sys/echo", "hello", { "content-type": "text/plain" });
      const out = { ready, res: plain(res), state: c.state, opens: c.opens, inFlight: c.inFlight };
      c.close();
      return out;
    }, apiA, tok.echo);
    const h = r.res.headers || {};
    check(
      g,
      "request/answer: 200, body, ok, error null, content-type, fedbus-partition = wsid%16, fedbus-shard, fedbus-hops 0, requestId set",
      r.ready && r.res.status === 200 && r.res.ok && r.res.error === null && r.res.body === "hello" && h["content-type"] === "text/plain" &&
        h["fedbus-partition"] === "10" && /^\d+$/.test(h["fedbus-shard"] ?? "") && h["fedbus-hops"] === "0" && typeof r.res.requestId === "number" &&
        r.state === "open" && r.opens === 1 && r.inFlight === 0,
      short(r),
    );

    const o = await ev(P, async (url, token) => {
      const c = mk(url, token);
      await c.ready(5000);
      const order = [];
      const slow = c.request("/api/local/dev/demo/echo/api/0/sys/echo", "slow-0").then((r) => (order.push("slow"), r));
      const fast = c.request("/api/local/dev/demo/echo/api/9/sys/echo", "fast-9").then((r) => (order.push("fast"), r));
      const [s, f] = await Promise.all([slow, fast]);
      c.close();
      return { order, s: plain(s), f: plain(f) };
    }, apiA, tok.echo);
    check(
      g,
      "answers out of order: a fast request sent second resolves first, each matched to its request",
      o.order.join() === "fast,slow" && o.s.body === "slow-0" && o.f.body === "fast-9" && o.s.headers["fedbus-partition"] === "0" && o.f.headers["fedbus-partition"] === "9",
      short({ order: o.order, s: [o.s.status, o.s.body], f: [o.f.status, o.f.body] }),
    );

    const m = await ev(P, async (url, token) => {
      const c = mk(url, token);
      await c.ready(5000);
      const ps = [];
      for (let i = 0; i < 200; i++) {
        const body = `b${i}-${Math.random()}`;
        ps.push(c.request(`/api/local/dev/demo/echo/api/${i}/sys/echo`, body).then((r) => ({ i, body, r: plain(r) })));
      }
      const inFlight = c.inFlight;
      const all = await Promise.all(ps);
      const bad = all.filter((x) => x.r.status !== 200 || x.r.body !== x.body || x.r.headers["fedbus-partition"] !== String(x.i % 16));
      const ids = new Set(all.map((x) => x.r.requestId));
      const out = { inFlight, bad: bad.slice(0, 3), nbad: bad.length, distinctIds: ids.size, opens: c.opens, sockets: sockets.filter((s) => s.url.includes(url.slice(7))).length };
      c.close();
      return out;
    }, apiA, tok.echo);
    check(g, "200 concurrent requests (mixed slow/fast partitions) on one session: every answer matches its request, distinct request ids", m.inFlight === 200 && m.nbad === 0 && m.distinctIds === 200 && m.opens === 1, short(m));

    const q = await ev(P, async (url, token) => {
      const c = mk(url, token);
      await c.ready(5000);
      const ps = [];
      for (let i = 0; i < 300; i++) ps.push(c.request(`/api/local/dev/demo/echo/api/${i % 8}/sys/echo`, "q" + i));
      const inFlight = c.inFlight;
      const all = (await Promise.all(ps)).map(plain);
      c.close();
      return { inFlight, maxInFlight: c.options.maxInFlight, ok: all.filter((r) => r.status === 200).length, errs: [...new Set(all.filter((r) => r.status !== 200).map((r) => `${r.status} ${r.error}`))] };
    }, apiA, tok.echo);
    check(g, "default maxInFlight (256): 300 slow requests, 256 on the wire, the rest queue in the client; all 200", q.maxInFlight === 256 && q.inFlight === 256 && q.ok === 300, short(q));

    const t = await ev(P, async (url, token) => {
      const c = mk(url, token, { maxInFlight: 1000 });
      await c.ready(5000);
      const ps = [];
      for (let i = 0; i < 300; i++) ps.push(c.request(`/api/local/dev/demo/echo/api/${i % 8}/sys/echo`, "t" + i));
      const all = (await Promise.all(ps)).map(plain);
      c.close();
      const tmi = all.filter((r) => r.status === 503 && r.error === "too_many_inflight");
      return { ok: all.filter((r) => r.status === 200).length, tmi: tmi.length, tmiRetryAfter: tmi[0]?.headers?.["retry-after"], other: all.filter((r) => r.status !== 200 && r.error !== "too_many_inflight").slice(0, 2) };
    }, apiA, tok.echo);
    check(g, "maxInFlight 1000 over the router's 256: the extra 44 are answered 503 too_many_inflight (retry-after: 1), the session goes on", t.ok === 256 && t.tmi === 44 && t.tmiRetryAfter === "1", short(t));
  });

  // ------------------------------------------------------------------------------------------
  await group("bodies and headers", async (g) => {
    const b = await ev(P, async (url, token) => {
      const c = mk(url, token);
      await c.ready(5000);
      const p = "/api/local/dev/demo/echo/api/8/sys/echo";
      const buf = new Uint8Array([10, 11, 12, 13, 14, 15, 16, 17]);
      const view = new Uint8Array(buf.buffer, 2, 3); // bytes 12,13,14
      const dv = new DataView(buf.buffer, 5, 2); // 15,16
      const u16 = new Uint16Array([0x0102, 0x0304]);
      const r = {};
      r.view = plain(await c.request(p, view));
      r.viewBytes = Array.from((await c.request(p, view)).body);
      r.dvBytes = Array.from((await c.request(p, dv)).body);
      r.abBytes = Array.from((await c.request(p, buf.buffer.slice(0, 2))).body);
      r.u16Len = (await c.request(p, u16)).body.length;
      r.empty = plain(await c.request(p));
      r.emptyStr = plain(await c.request(p, ""));
      r.uni = plain(await c.request(p, "héllo ✓ 𝄞", { "content-type": "text/plain; charset=utf-8" }));
      const j = await c.request(p, { a: 1, s: "x" });
      r.json = { ...plain(j), json: j.json() };
      r.textJson = (await c.request(p, "not json", { "content-type": "text/plain" })).json();
      r.capCT = plain(await c.request(p, "x", { "Content-Type": "text/x-cap" }));
      let threw = null;
      let v;
      try {
        const pr = c.request(p, 42);
        v = plain(await pr);
      } catch (e) {
        threw = String(e);
      }
      r.num = { v, threw };
      threw = null;
      try {
        v = plain(await c.request(p, new Blob(["blob"])));
      } catch (e) {
        threw = String(e);
      }
      r.blob = { v, threw };
      r.otherHeader = plain(await c.request(p, "x", { "x-trace": "1" }));
      r.get = plain(await c.request(p, null, undefined, { method: "GET" }));
      r.del = plain(await c.request(p, "d", undefined, { method: "DELETE" }));
      r.post = plain(await c.request(p, "d", undefined, { method: "POST" }));
      r.head = plain(await c.request(p, null, undefined, { method: "HEAD" }));
      r.options = plain(await c.request(p, null, undefined, { method: "OPTIONS" }));
      r.inFlight = c.inFlight;
      r.opens = c.opens;
      c.close();
      return r;
    }, apiA, tok.echo);
    check(g, "typed-array view with an offset sends only its bytes", b.viewBytes.join() === "12,13,14" && b.view.len === 3, short({ viewBytes: b.viewBytes }));
    check(g, "DataView and ArrayBuffer bodies send their bytes; Uint16Array its 4 bytes", b.dvBytes.join() === "15,16" && b.abBytes.join() === "10,11" && b.u16Len === 4, short({ dv: b.dvBytes, ab: b.abBytes, u16: b.u16Len }));
    check(g, "no body and empty string: 200 with an empty body", b.empty.status === 200 && b.empty.len === 0 && b.emptyStr.status === 200 && b.emptyStr.len === 0, short({ empty: pick(b.empty), emptyStr: pick(b.emptyStr) }));
    check(g, "UTF-8 text round trip", b.uni.status === 200 && b.uni.body === "héllo ✓ 𝄞", short(pick(b.uni)));
    check(
      g,
      "plain object is sent as JSON with content-type application/json; json() parses it; json() is undefined for non-JSON",
      b.json.status === 200 && b.json.headers["content-type"] === "application/json" && b.json.json?.a === 1 && b.json.json?.s === "x" && b.textJson === undefined,
      short({ json: b.json.json, ct: b.json.headers["content-type"], textJson: b.textJson }),
    );
    check(g, '"Content-Type" (capitalised, allowed by fedbus.d.ts) travels as the content type', b.capCT.status === 200 && b.capCT.headers["content-type"] === "text/x-cap", short({ s: b.capCT.status, e: b.capCT.error, ct: b.capCT.headers?.["content-type"] }));
    check(
      g,
      "a body of another type (number, Blob) resolves to bad_request (status 0, transport, requestId null), never throws/rejects",
      !b.num.threw && !b.blob.threw && b.num.v?.status === 0 && b.num.v?.error === "bad_request" && b.num.v?.transport === true && b.num.v?.requestId === null &&
        b.blob.v?.status === 0 && b.blob.v?.error === "bad_request",
      short({ num: b.num, blob: b.blob }),
    );
    check(g, "a header other than content-type resolves to bad_request, not sent", b.otherHeader.status === 0 && b.otherHeader.error === "bad_request" && b.otherHeader.requestId === null, short(pick(b.otherHeader)));
    check(
      g,
      "method GET/DELETE reach the task (echo-method); POST is the default (no echo-method); HEAD and OPTIONS resolve to bad_request unsent",
      b.get.status === 200 && b.get.headers["echo-method"] === "GET" && b.del.headers?.["echo-method"] === "DELETE" && b.post.status === 200 && !b.post.headers["echo-method"] &&
        b.head.status === 0 && b.head.error === "bad_request" && b.options.status === 0 && b.options.error === "bad_request",
      short({ get: [b.get.status, b.get.headers?.["echo-method"]], del: b.del.headers?.["echo-method"], head: pick(b.head), options: pick(b.options) }),
    );
    check(g, "after all that: nothing in flight, one socket", b.inFlight === 0 && b.opens === 1, short({ inFlight: b.inFlight, opens: b.opens }));
  });

  // ------------------------------------------------------------------------------------------
  await group("router errors on /api/ws", async (g) => {
    const e = await ev(P, async (url, toks) => {
      const c = mk(url, toks.echo);
      await c.ready(5000);
      const r = {};
      const t0 = Date.now();
      r.unknownCluster = plain(await c.request("/api/xx/yy/demo/echo/api/1/sys/echo", "x"));
      r.badWsid = plain(await c.request("/api/local/dev/demo/echo/api/abc/sys/echo", "x"));
      r.short = plain(await c.request("/api/local/dev/demo/echo", "x"));
      r.notApi = plain(await c.request("/foo/bar", "x"));
      r.wrongApp = plain(await c.request("/api/local/dev/demo/slow/api/1/sys/echo", "x"));
      r.unknownApp = plain(await c.request("/api/local/dev/demo/nope/api/1/sys/echo", "x"));
      r.taskStatus = plain(await c.request("/api/local/dev/demo/echo/api/8/status/418", "x"));
      r.ms = Date.now() - t0;
      r.opens = c.opens;
      r.state = c.state;
      c.close();
      const d = mk(url, toks.down);
      await d.ready(5000);
      r.down = plain(await d.request("/api/local/dev/demo/down/api/1/sys/echo", "x"));
      d.close();
      const s = mk(url, toks.slow);
      await s.ready(5000);
      const t1 = Date.now();
      r.timeout = plain(await s.request("/api/local/dev/demo/slow/api/1/sys/echo", "x"));
      r.timeoutMs = Date.now() - t1;
      s.close();
      const gh = mk(url, toks.ghost);
      r.ghostReady = await gh.ready(3000);
      r.ghost = plain(await gh.request("/api/local/dev/demo/ghost/api/1/sys/echo", "x", undefined, { timeoutMs: 3000 }));
      gh.close();
      return r;
    }, apiA, tok);
    const isRouterErr = (x, st, code) => x.status === st && x.error === code && typeof x.message === "string" && x.message.length > 0 && x.headers["content-type"] === "application/json";
    check(g, "unknown cluster: 404 unknown_cluster with message, content-type application/json", isRouterErr(e.unknownCluster, 404, "unknown_cluster"), short(pick(e.unknownCluster)));
    check(g, "bad wsid: 400 bad_wsid", isRouterErr(e.badWsid, 400, "bad_wsid"), short(pick(e.badWsid)));
    check(g, "malformed /api/ path: the router answers 400 bad_path (or 404 not_found)", (e.short.status === 404 && e.short.error === "not_found") || (e.short.status === 400 && e.short.error === "bad_path"), short(pick(e.short)));
    check(g, "a path outside /api/ (\"/foo/bar\"): refused by the client as the README says, bad_request \"path must start with /api/\", unsent (requestId null)", e.notApi.status === 0 && e.notApi.error === "bad_request" && e.notApi.message === "path must start with /api/" && e.notApi.requestId === null, short(pick(e.notApi)));
    check(g, "path's app (allowing the origin) differs from the token's: 403 wrong_app", isRouterErr(e.wrongApp, 403, "wrong_app"), short(pick(e.wrongApp)));
    check(g, "task's own non-2xx: status, error http_<status>", e.taskStatus.status === 418 && e.taskStatus.error === "http_418" && !e.taskStatus.ok, short(pick(e.taskStatus)));
    check(g, "the errors above leave the session open (one socket)", e.opens === 1 && e.state === "open", short({ opens: e.opens, state: e.state }));
    check(g, "app with no task: 503 no_live_task with retry-after: 1", isRouterErr(e.down, 503, "no_live_task") && e.down.headers["retry-after"] === "1", short({ ...pick(e.down), ra: e.down.headers?.["retry-after"] }));
    check(
      g,
      `task slower than request_timeout_ms (${A_REQUEST_TIMEOUT_MS}): 504 task_timeout after about that long`,
      isRouterErr(e.timeout, 504, "task_timeout") && e.timeoutMs >= A_REQUEST_TIMEOUT_MS - 100 && e.timeoutMs < A_REQUEST_TIMEOUT_MS + 1500,
      short({ ...pick(e.timeout), ms: e.timeoutMs }),
    );
    check(g, "app in the keyring but not configured on the router (session token of that app): 404 unknown_app", e.ghostReady && isRouterErr(e.ghost, 404, "unknown_app"), short({ ready: e.ghostReady, ...pick(e.ghost) }));

    // A task lost with the request pending: 502 task_lost.
    await ev(P, async (url, token) => {
      window.lost = mk(url, token);
      await window.lost.ready(5000);
      window.lostP = window.lost.request("/api/local/dev/demo/lost/api/1/sys/echo", "x").then(plain);
    }, apiA, tok.lost);
    await waitFor(() => P.evaluate(() => window.lost.inFlight === 1), "lost request in flight", 3000);
    await sleep(100); // the frame is on its way to the task; the task holds it for 10 s
    lostTask.kill("SIGKILL");
    const lost = await ev(P, async () => {
      const r = await window.lostP;
      window.lost.close();
      return r;
    });
    check(g, "task killed with the request pending: 502 task_lost", lost.status === 502 && lost.error === "task_lost", short(pick(lost)));
  });

  // ------------------------------------------------------------------------------------------
  await group("sizes", async (g) => {
    const s = await ev(P, async (url, token, maxBody) => {
      const c = mk(url, token);
      await c.ready(5000);
      const p = "/api/local/dev/demo/echo/api/8/sys/echo";
      const r = {};
      r.atMax = plain(await c.request(p, new Uint8Array(maxBody)));
      r.overMax = plain(await c.request(p, new Uint8Array(maxBody + 1)));
      r.opensBefore = c.opens;
      const t0 = Date.now();
      r.huge = plain(await c.request(p, new Uint8Array(maxBody + 65536 + 100)));
      r.hugeMs = Date.now() - t0;
      r.states = c._states.slice();
      await until(() => c.state === "open" && c.opens === 2, 5000);
      r.after = plain(await c.request(p, "after"));
      r.opensAfter = c.opens;
      c.close();
      return r;
    }, apiA, tok.echo, A_MAX_BODY);
    check(g, "body of exactly max_body_bytes: 200, echoed", s.atMax.status === 200 && s.atMax.len === A_MAX_BODY, short({ status: s.atMax.status, len: s.atMax.len }));
    check(
      g,
      "body of max_body_bytes+1 (message within max_body_bytes+64KiB): 413 body_too_large answer, session goes on (as HTTP)",
      s.overMax.status === 413 && s.overMax.error === "body_too_large" && s.opensBefore === 1,
      short({ ...pick(s.overMax), opens: s.opensBefore }),
    );
    const closed = s.states.find((x) => x[0] === "waiting" || x[0] === "idle");
    check(
      g,
      "message over max_body_bytes+64KiB: router closes 1009; the request resolves to disconnected; the client reconnects and serves the next",
      s.huge.status === 0 && s.huge.error === "disconnected" && closed?.[1] === 1009 && s.after.status === 200 && s.opensAfter === 2,
      short({ huge: pick(s.huge), ms: s.hugeMs, states: s.states, after: pick(s.after), opens: s.opensAfter }),
    );

    const a = await ev(P, async (url, anonMax) => {
      const c = mk(url, null);
      const r = { ready: await c.ready(5000) };
      r.api = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "x"));
      r.auth = plain(await c.request("/api/local/dev/demo/echo/auth/8/sys/echo", "anon"));
      r.authMax = plain(await c.request("/api/local/dev/demo/echo/auth/8/sys/echo", new Uint8Array(anonMax)));
      r.authOver = plain(await c.request("/api/local/dev/demo/echo/auth/8/sys/echo", new Uint8Array(anonMax + 1)));
      r.opensBefore = c.opens;
      r.huge = plain(await c.request("/api/local/dev/demo/echo/auth/8/sys/echo", new Uint8Array(anonMax + 65536 + 100)));
      r.states = c._states.slice();
      c.close();
      return r;
    }, apiA, ANON_MAX_BODY);
    check(g, "anonymous session (token null): service api answers 401 missing_token; anonymous service auth answers 200", a.ready && a.api.status === 401 && a.api.error === "missing_token" && a.auth.status === 200 && a.auth.body === "anon", short({ api: pick(a.api), auth: pick(a.auth) }));
    check(
      g,
      "anonymous: body of max_anonymous_body_bytes is 200, one byte more is 413 body_too_large, session goes on",
      a.authMax.status === 200 && a.authOver.status === 413 && a.authOver.error === "body_too_large" && a.opensBefore === 1,
      short({ max: pick(a.authMax), over: pick(a.authOver), opens: a.opensBefore }),
    );
    const ac = a.states.find((x) => x[0] === "waiting" || x[0] === "idle");
    check(g, "anonymous: message over max_anonymous_body_bytes+64KiB closes 1009; request resolves disconnected", a.huge.status === 0 && a.huge.error === "disconnected" && ac?.[1] === 1009, short({ huge: pick(a.huge), states: a.states }));
  });

  // ------------------------------------------------------------------------------------------
  await group("raw websocket", async (g) => {
    const w = await ev(P, async (url, token) => {
      const run = (send) =>
        new Promise((resolve) => {
          const ws = new WebSocket(url.replace("http", "ws") + "/api/ws?access_token=" + token);
          ws.binaryType = "arraybuffer";
          const t = setTimeout(() => resolve({ timeout: true }), 5000);
          ws.onopen = () => send(ws);
          ws.onclose = (e) => (clearTimeout(t), resolve({ code: e.code, reason: e.reason }));
        });
      const r = {};
      r.text = await run((ws) => ws.send("hello"));
      r.garbage = await run((ws) => ws.send(new Uint8Array([1, 2, 3, 4, 5])));
      const resp = fb.encodeRequest(7, "/api/local/dev/demo/echo/api/8/sys/echo", new Uint8Array(0));
      resp[1] = 2; // kind Response
      r.kind2 = await run((ws) => ws.send(resp));
      // A valid request by hand: the answer carries the client-chosen id (a large one).
      r.answer = await new Promise((resolve) => {
        const ws = new WebSocket(url.replace("http", "ws") + "/api/ws?access_token=" + token);
        ws.binaryType = "arraybuffer";
        const t = setTimeout(() => resolve({ timeout: true }), 5000);
        ws.onopen = () => {
          const f = fb.encodeRequest(1, "/api/local/dev/demo/echo/api/8/sys/echo", new TextEncoder().encode("raw"));
          // request id 2^40 + 5 (bytes 8..15)
          new DataView(f.buffer, f.byteOffset).setBigUint64(8, (1n << 40n) + 5n);
          ws.send(f);
        };
        ws.onmessage = (m) => {
          clearTimeout(t);
          const fr = fb.decodeFrame(m.data);
          const id = new DataView(new Uint8Array(m.data).buffer).getBigUint64(8).toString();
          ws.close();
          resolve({ kind: fr.kind, id, body: new TextDecoder().decode(fr.payload) });
        };
      });
      return r;
    }, apiA, tok.echo);
    check(g, "a text message closes with 1003", w.text.code === 1003, short(w.text));
    check(g, "a binary message that is not a fedbus frame closes with 1002", w.garbage.code === 1002, short(w.garbage));
    check(g, "a frame of kind Response from the client closes with 1002", w.kind2.code === 1002, short(w.kind2));
    check(g, "a hand-made Request with a 64-bit id 2^40+5: answered kind 2 with the same id", w.answer.kind === 2 && w.answer.id === String(2n ** 40n + 5n) && w.answer.body === "raw", short(w.answer));
  });

  // ------------------------------------------------------------------------------------------
  await group("client API", async (g) => {
    const t = await ev(P, async (url, token, slowMs) => {
      const c = mk(url, token);
      await c.ready(5000);
      const t0 = Date.now();
      const r = plain(await c.request("/api/local/dev/demo/echo/api/0/sys/echo", "x", undefined, { timeoutMs: 200 }));
      const ms = Date.now() - t0;
      const inFlightAtTimeout = c.inFlight;
      await sleep(slowMs + 300); // the late answer arrives
      const inFlightLater = c.inFlight;
      const next = plain(await c.request("/api/local/dev/demo/echo/api/9/sys/echo", "next"));
      const out = { r, ms, inFlightAtTimeout, inFlightLater, next, opens: c.opens };
      c.close();
      return out;
    }, apiA, tok.echo, SLOW_MS);
    check(
      g,
      "timeoutMs 200 on a 700 ms request: resolves to timeout at ~200 ms, still counted in inFlight until the late answer, which is ignored; the session goes on",
      t.r.status === 0 && t.r.error === "timeout" && t.ms >= 180 && t.ms < 600 && t.inFlightAtTimeout === 1 && t.inFlightLater === 0 && t.next.status === 200 && t.next.body === "next" && t.opens === 1,
      short(t),
    );

    // Client-side timeouts resolve the promises, but the router still holds those requests until
    // the task answers: the client keeps their slots (inFlight stays 256) until the late answers
    // come, so the next 20 wait in the client's queue instead of being refused 503
    // too_many_inflight by the router, and are all served.
    const h = await ev(P, async (url, token) => {
      const c = mk(url, token);
      await c.ready(5000);
      const timedOut = [];
      for (let i = 0; i < 256; i++) timedOut.push(c.request(`/api/local/dev/demo/echo/api/${i % 8}/sys/echo`, "t", undefined, { timeoutMs: 100 }));
      const tos = (await Promise.all(timedOut)).map((r) => r.error);
      const inFlightAfterTimeouts = c.inFlight;
      const next = [];
      for (let i = 0; i < 20; i++) next.push(c.request(`/api/local/dev/demo/echo/api/${8 + (i % 8)}/sys/echo`, "n" + i));
      const queuedAfterTimeouts = c._queue.length;
      const all = (await Promise.all(next)).map(plain);
      await until(() => c.inFlight === 0, 3000).catch(() => {});
      const inFlightEnd = c.inFlight;
      // The timed-out promises keep their timeout value (the late answers are not delivered).
      const stillTimeout = (await Promise.all(timedOut)).filter((r) => r.error === "timeout").length;
      const opens = c.opens;
      c.close();
      return {
        timeouts: tos.filter((e) => e === "timeout").length,
        inFlightAfterTimeouts,
        queuedAfterTimeouts,
        inFlightEnd,
        stillTimeout,
        opens,
        ok: all.filter((r) => r.status === 200).length,
        bodiesMatch: all.every((r, i) => r.body === "n" + i),
        errs: [...new Set(all.filter((r) => r.status !== 200).map((r) => `${r.status} ${r.error}`))],
      };
    }, apiA, tok.echo);
    check(
      g,
      "client slots freed by timeouts: after 256 client-side timeouts (task still working on them) the slots stay taken (inFlight 256) until the late answers; 20 new requests wait, then all 20 are answered 200, none 503 too_many_inflight",
      h.timeouts === 256 && h.inFlightAfterTimeouts === 256 && h.queuedAfterTimeouts === 20 && h.ok === 20 && h.bodiesMatch && h.errs.length === 0 && h.inFlightEnd === 0 && h.stillTimeout === 256 && h.opens === 1,
      short(h),
    );

    // Backoff without jitter: initialMs * factor^attempt capped at maxMs.
    const bo = await ev(P, async () => {
      const c = mk("http://127.77.0.9:9", "x", { backoff: { initialMs: 20, factor: 3, maxMs: 200, jitter: 0 } });
      await until(() => c._states.filter((s) => s[0] === "waiting").length >= 5, 3000);
      c.close();
      return c._states.filter((s) => s[0] === "waiting").map((s) => Math.round(s[2]));
    });
    check(g, "backoff (initialMs 20, factor 3, maxMs 200, jitter 0): waits 20, 60, 180, 200, 200", bo.slice(0, 5).join() === "20,60,180,200,200", short(bo));

    const cl = await ev(P, async (url, token) => {
      const c = mk(url, token);
      await c.ready(5000);
      const pending = c.request("/api/local/dev/demo/echo/api/0/sys/echo", "x");
      await sleep(50);
      const inFlight = c.inFlight;
      c.close();
      const t0 = Date.now();
      const p = plain(await pending);
      const ms = Date.now() - t0;
      const later = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "y"));
      const ready = await c.ready(1000);
      const s = sockets[sockets.length - 1];
      await until(() => s.readyState === 3, 2000);
      await sleep(300);
      return { inFlight, p, ms, later, ready, state: c.state, states: c._states, sockReady: s.readyState, opens: c.opens };
    }, apiA, tok.echo);
    check(
      g,
      "close(): the pending request resolves to closed at once, later ones too; ready() false; state closed; no reconnect",
      cl.inFlight === 1 && cl.p.status === 0 && cl.p.error === "closed" && cl.ms < 200 && cl.later.error === "closed" && cl.ready === false && cl.state === "closed" && cl.sockReady === 3 && cl.opens === 1,
      short(cl),
    );

    const d = await ev(P, async () => {
      const dead = "http://127.77.0.9:9"; // nothing listens there
      const r = {};
      const a = mk(dead, "x", { connectTimeoutMs: 600 });
      let t0 = Date.now();
      r.ready = await a.ready(400);
      r.readyMs = Date.now() - t0;
      t0 = Date.now();
      r.wait = plain(await a.request("/api/local/dev/demo/echo/api/8/sys/echo", "x"));
      r.waitMs = Date.now() - t0;
      r.stateA = a.state;
      r.statesA = a._states.slice(0, 6);
      a.close();
      const b = mk(dead, "x", { whileDisconnected: "fail" });
      t0 = Date.now();
      r.fail = plain(await b.request("/api/local/dev/demo/echo/api/8/sys/echo", "x"));
      r.failMs = Date.now() - t0;
      b.close();
      return r;
    });
    check(g, "unreachable router: ready(400) resolves false after ~400 ms", d.ready === false && d.readyMs >= 350 && d.readyMs < 1000, short({ ready: d.ready, ms: d.readyMs }));
    check(g, 'whileDisconnected "wait": a request resolves to not_connected after connectTimeoutMs (600)', d.wait.status === 0 && d.wait.error === "not_connected" && d.waitMs >= 150 && d.waitMs < 1200, short({ ...pick(d.wait), ms: d.waitMs, states: d.statesA }));
    check(g, 'whileDisconnected "fail": a request resolves to not_connected at once', d.fail.status === 0 && d.fail.error === "not_connected" && d.failMs < 100, short({ ...pick(d.fail), ms: d.failMs }));

    const q = await ev(P, async (url, token) => {
      const r = {};
      const c = mk(url, token);
      r.stateAtStart = c.state;
      r.first = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "queued"));
      c.close();
      const w = mk(url.replace("http://", "ws://") + "/api/ws", token);
      r.wsUrl = plain(await w.request("/api/local/dev/demo/echo/api/8/sys/echo", "ws-url"));
      r.wsSock = sockets[sockets.length - 1].url;
      w.close();
      r.urls = [fb.wsUrl("http://h:1", "T"), fb.wsUrl("https://h:1", "T"), fb.wsUrl("ws://h:1/api/ws", "T"), fb.wsUrl("http://h:1/", "T"), fb.wsUrl("http://h:1")];
      return r;
    }, apiA, tok.echo);
    check(g, "a request made before the socket opens is queued and sent on open (wait mode)", q.stateAtStart === "connecting" && q.first.status === 200 && q.first.body === "queued", short({ s: q.stateAtStart, first: pick(q.first) }));
    check(g, "a full ws://host:port/api/ws URL works too", q.wsUrl.status === 200 && q.wsUrl.body === "ws-url", short({ r: pick(q.wsUrl), sock: q.wsSock }));
    check(
      g,
      "wsUrl: http->ws, https->wss, ?access_token=, no token no query",
      q.urls[0] === "ws://h:1/api/ws?access_token=T" && q.urls[1] === "wss://h:1/api/ws?access_token=T" && q.urls[2] === "ws://h:1/api/ws?access_token=T" && q.urls[4] === "ws://h:1/api/ws",
      short(q.urls),
    );
    check(g, "wsUrl of http://host:port/ (trailing slash) gives a single-slash /api/ws", q.urls[3] === "ws://h:1/api/ws?access_token=T", short(q.urls[3]));
  });

  // ------------------------------------------------------------------------------------------
  await group("tokens", async (g) => {
    // exp is checked with 5 s of leeway (docs/ROTATION.md, "Client JWTs"): wait past exp + 5 s.
    const LEEWAY_MS = 5000;
    const expired = clientToken("demo/echo", "1s");
    const shortTok = clientToken("demo/echo", "1s");
    const fresh = tok.echo;
    const exp = JSON.parse(Buffer.from(expired.split(".")[1], "base64url").toString()).exp;
    const sexp = JSON.parse(Buffer.from(shortTok.split(".")[1], "base64url").toString()).exp;
    // A session opened with the short token (through a token function), used before it expires.
    await ev(P, async (url, shortTok, fresh) => {
      window.expCalls = 0;
      window.expClient = mk(url, async () => (++window.expCalls === 1 ? shortTok : fresh));
      window.expFirst = plain(await window.expClient.request("/api/local/dev/demo/echo/api/8/sys/echo", "before"));
    }, apiA, shortTok, fresh);
    // The router closes at the first request once now (unix seconds) > exp + 5, i.e. from
    // (sexp + 6) * 1000 ms: a slow request sent 300 ms before that instant is served, one sent
    // 150 ms after it is not; "the answers to the requests before it go out first, then the close".
    const boundary = (sexp + 1 + LEEWAY_MS / 1000) * 1000;
    await waitFor(() => Date.now() > boundary - 300, "300 ms before the short token's exp + leeway", 10000);
    const x0 = await ev(P, async (boundary) => {
      const c = window.expClient;
      const slow = c.request("/api/local/dev/demo/echo/api/0/sys/echo", "before-exp-slow").then((r) => ({ r: plain(r), t: Date.now() }));
      const sentSlowAt = Date.now();
      await until(() => Date.now() > boundary + 150, 2000);
      const sentAfterAt = Date.now();
      const after = c.request("/api/local/dev/demo/echo/api/8/sys/echo", "after-exp").then((r) => ({ r: plain(r), t: Date.now() }));
      const [s, a] = await Promise.all([slow, after]);
      return { slow: s.r, after: a.r, sentSlowMsBeforeBoundary: boundary - sentSlowAt, sentAfterMsAfterBoundary: sentAfterAt - boundary };
    }, boundary);
    await waitFor(() => Date.now() > Math.max(exp, sexp) * 1000 + LEEWAY_MS + 1100, "exp + leeway of the 1 s tokens", 10000);
    // Upgrade answers from node.
    const upExp = await upgradeHead(A.api, { token: expired });
    const upBad = await upgradeHead(A.api, { token: "garbage" });
    const upGhostless = await upgradeHead(A.api, { token: tok.echo.replace(/\.[^.]*$/, ".AAAA") });
    check(g, "upgrade with an expired token: 401 expired_token JSON before the 101", upExp.status === 401 && jsonOr(upExp.rest).error === "expired_token", short({ status: upExp.status, body: upExp.rest, err: upExp.error }));
    check(g, "upgrade with a malformed token: 401 bad_token", upBad.status === 401 && jsonOr(upBad.rest).error === "bad_token", short({ status: upBad.status, body: upBad.rest }));
    check(g, "upgrade with a bad signature: 401 bad_signature", upGhostless.status === 401 && jsonOr(upGhostless.rest).error === "bad_signature", short({ status: upGhostless.status, body: upGhostless.rest }));

    const b = await ev(P, async (url, expired) => {
      const c = mk(url, expired, { connectTimeoutMs: 1500 });
      const r = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "x"));
      const out = { r, opens: c.opens, state: c.state, states: c._states.slice(0, 4) };
      c.close();
      return out;
    }, apiA, expired);
    check(g, "client with an expired token string: never opens, request resolves to not_connected", b.opens === 0 && b.r.status === 0 && b.r.error === "not_connected", short(b));

    // A token function: an expired token first, then a fresh one; called before every connect.
    const f = await ev(P, async (url, expired, fresh) => {
      let calls = 0;
      const c = mk(url, () => (++calls === 1 ? expired : fresh));
      const r = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "fn"));
      const out = { r, calls, opens: c.opens };
      c.close();
      return out;
    }, apiA, expired, fresh);
    check(g, "token function: an expired first token is refused, the function is called again on the retry, the request is served", f.r.status === 200 && f.calls >= 2 && f.opens === 1, short(f));

    // Expiry during the session (opened above): 1008 on the next request, then reconnect with a fresh token.
    const x = await ev(P, async () => {
      const c = window.expClient;
      const first = window.expFirst;
      await until(() => c.state === "open" && c.opens === 2, 5000);
      const again = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "again"));
      const out = { first, again, calls: window.expCalls, opens: c.opens, states: c._states.slice() };
      c.close();
      return out;
    });
    const code1008 = x.states.find((s) => s[1] === 1008);
    check(
      g,
      "token expired during the session: a request after exp (+5 s leeway) is not served (close 1008, resolves disconnected); a slow one sent before it is answered first",
      x.first.status === 200 && x0.after.status === 0 && x0.after.error === "disconnected" && code1008 && x0.slow.status === 200 && x0.slow.body === "before-exp-slow",
      short({ first: pick(x.first), ...x0, slow: pick(x0.slow), after: pick(x0.after), states: x.states }),
    );
    check(g, "...and the client reconnects with the token function's fresh token; the next request is served", x.again.status === 200 && x.again.body === "again" && x.calls >= 2 && x.opens === 2, short({ again: pick(x.again), calls: x.calls, opens: x.opens }));

    // Token functions that yield nothing or throw: an error, not an anonymous session, never a rejection.
    const n = await ev(P, async (url) => {
      const out = {};
      for (const [name, fn] of [
        ["empty", () => ""],
        ["undef", () => undefined],
        ["throws", () => {
          throw new Error("no token");
        }],
        ["rejects", () => Promise.reject(new Error("no token"))],
      ]) {
        let threw = null;
        let r;
        let c;
        try {
          c = mk(url, fn, { connectTimeoutMs: 800 });
          r = plain(await c.request("/api/local/dev/demo/echo/auth/8/sys/echo", "anon?"));
        } catch (e) {
          threw = String(e);
        }
        out[name] = { r: r && { status: r.status, error: r.error, message: r.message }, threw, opens: c?.opens };
        c?.close();
      }
      return out;
    }, apiA);
    const noAnon = Object.values(n).every((v) => !v.threw && v.r?.status === 0 && v.opens === 0);
    check(g, "token function yielding nothing / throwing / rejecting: no anonymous session is opened, the request resolves to a transport error", noAnon, short(n));
  });

  // ------------------------------------------------------------------------------------------
  await group("CORS and fetch", async (g) => {
    const f = await ev(P, async (url, token, maxBody, downToken) => {
      const p = url + "/api/local/dev/demo/echo/api/9/sys/echo";
      const go = async (u, init) => {
        try {
          const r = await fetch(u, init);
          const h = {};
          for (const n of ["fedbus-partition", "fedbus-shard", "fedbus-hops", "echo-method", "content-type", "retry-after"]) h[n] = r.headers.get(n);
          return { status: r.status, body: await r.text(), h };
        } catch (e) {
          return { threw: e.name + ": " + e.message };
        }
      };
      const auth = { Authorization: "Bearer " + token };
      const r = {};
      r.get = await go(p, { headers: auth });
      r.put = await go(p, { method: "PUT", headers: { ...auth, "Content-Type": "text/plain" }, body: "put" });
      r.custom = await go(p, { method: "POST", headers: { ...auth, "X-Custom": "1" }, body: "x" });
      r.big = await go(p, { method: "POST", headers: { ...auth, "Content-Type": "application/octet-stream" }, body: new Uint8Array(maxBody + 1) });
      r.down = await go(url + "/api/local/dev/demo/down/api/1/sys/echo", { method: "POST", headers: { Authorization: "Bearer " + downToken }, body: "x" });
      r.unknownCluster = await go(url + "/api/xx/yy/demo/echo/api/1/sys/echo", { method: "POST", headers: auth, body: "x" });
      // A simple request (no preflight): the 404 itself, not a preflight's.
      r.unknownClusterSimple = await go(url + "/api/xx/yy/demo/echo/api/1/sys/echo");
      r.other = await go(url + "/api/local/dev/demo/other/api/1/sys/echo", { method: "POST", headers: auth, body: "x" });
      const badSig = { Authorization: "Bearer " + token.replace(/\.[^.]*$/, ".AAAA") };
      r.badSmall = await go(p, { method: "POST", headers: badSig, body: "x" });
      r.badLarge = await go(p, { method: "POST", headers: badSig, body: new Uint8Array(100000) });
      r.anonOver = await go(url + "/api/local/dev/demo/echo/auth/9/sys/echo", { method: "POST", headers: { "Content-Type": "text/plain" }, body: "a".repeat(70000) });
      return r;
    }, apiA, tok.echo, A_MAX_BODY, tok.down);
    check(g, "fetch GET with Bearer from the allowed origin: 200, fedbus-* readable", f.get.status === 200 && f.get.h["fedbus-partition"] === "9" && f.get.h["fedbus-hops"] === "0" && /^\d+$/.test(f.get.h["fedbus-shard"] ?? ""), short(f.get));
    check(g, "fetch PUT: 200, echoed", f.put.status === 200 && f.put.body === "put", short(f.put));
    check(g, "fetch with a header not in allowed_headers: the preflight does not allow it (TypeError)", f.custom.threw?.startsWith("TypeError"), short(f.custom));
    check(g, "fetch with a body over max_body_bytes: the router's 413 body_too_large is readable by the page", f.big.status === 413 && jsonOr(f.big.body).error === "body_too_large", short(f.big));
    check(g, "fetch with a bad-signature token, small body: the router's 401 bad_signature is readable", f.badSmall.status === 401 && jsonOr(f.badSmall.body).error === "bad_signature", short(f.badSmall));
    check(g, "fetch with a bad-signature token, 100 kB body (refused from the head): the 401 bad_signature is readable too", f.badLarge.status === 401 && jsonOr(f.badLarge.body).error === "bad_signature", short(f.badLarge));
    check(g, "fetch to the anonymous service with a body over max_anonymous_body_bytes: the 413 body_too_large is readable", f.anonOver.status === 413 && jsonOr(f.anonOver.body).error === "body_too_large", short(f.anonOver));
    check(g, "fetch to an app with no task: 503 no_live_task readable", f.down.status === 503 && jsonOr(f.down.body).error === "no_live_task", short(f.down));
    check(g, "simple fetch to an unknown cluster: the router's 404 unknown_cluster readable (some app allows the origin)", f.unknownClusterSimple.status === 404 && jsonOr(f.unknownClusterSimple.body).error === "unknown_cluster", short(f.unknownClusterSimple));
    check(g, "preflighted fetch to an unknown cluster: the preflight is 404 too, so the browser fails it (PROTOCOL.md 8.1)", f.unknownCluster.threw?.startsWith("TypeError"), short(f.unknownCluster));
    check(g, "fetch to an app whose CORS does not list the origin (demo/other): fails in the browser (403 without Allow-Origin)", f.other.threw?.startsWith("TypeError"), short(f.other));

    // The /api/ws session is checked per request against each app's policy.
    const s = await ev(P, async (url, token) => {
      const c = mk(url, token);
      const ready = await c.ready(5000);
      const a = plain(await c.request("/api/local/dev/demo/other/api/1/sys/echo", "x"));
      const b = plain(await c.request("/api/local/dev/demo/other/api/2/sys/echo", "y"));
      const out = { ready, a, b, opens: c.opens, state: c.state };
      c.close();
      return out;
    }, apiA, tok.other);
    check(
      g,
      "session opened (demo/echo allows the origin) with a demo/other token: demo/other requests answer 403 origin_not_allowed, the session goes on",
      s.ready && s.a.status === 403 && s.a.error === "origin_not_allowed" && s.b.error === "origin_not_allowed" && s.opens === 1 && s.state === "open",
      short({ ready: s.ready, a: pick(s.a), b: pick(s.b), opens: s.opens }),
    );

    // From node: case-insensitive origin, same-origin upgrade.
    const okUpper = OK.replace("http://", "HTTP://");
    const ci = await httpRequest("POST", `${apiA}/api/local/dev/demo/echo/api/9/sys/echo`, { authorization: `Bearer ${tok.echo}`, origin: okUpper }, "ci");
    check(g, "Origin compared ignoring ASCII case; Allow-Origin echoes the request's Origin", ci.status === 200 && ci.headers["access-control-allow-origin"] === okUpper, short({ status: ci.status, acao: ci.headers?.["access-control-allow-origin"] }));
    const evilUC = await httpRequest("POST", `${apiA}/api/xx/yy/demo/echo/api/9/sys/echo`, { authorization: `Bearer ${tok.echo}`, origin: BAD }, "x");
    const evilUA = await httpRequest("POST", `${apiA}/api/local/dev/demo/nope/api/9/sys/echo`, { authorization: `Bearer ${tok.echo}`, origin: BAD }, "x");
    check(
      g,
      "an origin no app allows gets no Access-Control-Allow-Origin, also on 404 unknown_cluster / unknown_app answers",
      !evilUC.headers?.["access-control-allow-origin"] && !evilUA.headers?.["access-control-allow-origin"],
      short({ unknownCluster: [evilUC.status, evilUC.headers?.["access-control-allow-origin"]], unknownApp: [evilUA.status, evilUA.headers?.["access-control-allow-origin"]] }),
    );
    const upCi = await upgradeHead(A.api, { token: tok.echo, origin: okUpper });
    check(g, "/api/ws upgrade with the allowed origin in upper case: 101", upCi.status === 101, short(upCi.head || upCi.error));
    const same = await upgradeHead(A.api, { token: tok.echo, origin: `http://${A.api}` });
    check(g, "/api/ws upgrade with a same-origin Origin (http://<Host>): 101 though not listed", same.status === 101, short(same.head || same.error));
    const upBad = await upgradeHead(A.api, { token: tok.echo, origin: BAD });
    check(g, "/api/ws upgrade from a listed-nowhere origin: 403 origin_not_allowed, no Allow-Origin", upBad.status === 403 && jsonOr(upBad.rest).error === "origin_not_allowed" && !/access-control-allow-origin/i.test(upBad.head), short({ head: upBad.head, body: upBad.rest }));

    // The page on the other origin.
    const q = await ev(Q, async (url, token) => {
      const c = mk(url, token, { connectTimeoutMs: 1500 });
      const ready = await c.ready(1000);
      const r = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "x"));
      const out = { ready, r, opens: c.opens, states: c._states.slice(0, 5).map((s) => s[0] + (s[2] != null ? "/" + Math.round(s[2]) : "")) };
      c.close();
      return out;
    }, apiA, tok.echo);
    check(g, "client from the disallowed origin: never opens, ready false, request resolves to not_connected", q.ready === false && q.opens === 0 && q.r.error === "not_connected", short(q));
  });

  // ------------------------------------------------------------------------------------------
  await group("idle and pings", async (g) => {
    const i = await ev(P, async (url, token, idleMs) => {
      const c = mk(url, token);
      await c.ready(5000);
      const r = { first: plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "first")) };
      const t0 = Date.now();
      r.wentIdle = await until(() => c.state === "idle", idleMs * 2 + 2000);
      r.idleAfterMs = Date.now() - t0;
      r.states = c._states.slice();
      await sleep(800);
      r.opensWhileIdle = c.opens;
      r.stateLater = c.state;
      r.next = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "next"));
      r.opens = c.opens;
      c.close();
      // Idle client with whileDisconnected "fail": it still connects first.
      const f = mk(url, token, { whileDisconnected: "fail" });
      await f.ready(5000);
      await until(() => f.state === "idle", idleMs * 2 + 2000);
      r.failIdleState = f.state;
      r.failNext = plain(await f.request("/api/local/dev/demo/echo/api/8/sys/echo", "fail-mode"));
      f.close();
      return r;
    }, api(B), tok.echo, IDLE_MS);
    const idleClose = i.states.find((s) => s[0] === "idle");
    check(
      g,
      `router idle_timeout_ms ${IDLE_MS}: the session is closed 1001 within 1-2x; the client goes idle and does not reconnect by itself`,
      i.first.status === 200 && i.wentIdle && idleClose?.[1] === 1001 && i.idleAfterMs >= IDLE_MS - 200 && i.opensWhileIdle === 1 && i.stateLater === "idle",
      short({ idleAfterMs: i.idleAfterMs, states: i.states, opensWhileIdle: i.opensWhileIdle, stateLater: i.stateLater }),
    );
    check(g, "idle client: the next request reconnects and is served", i.next.status === 200 && i.next.body === "next" && i.opens === 2, short({ next: pick(i.next), opens: i.opens }));
    check(g, 'idle client with whileDisconnected "fail": still connects first, served', i.failIdleState === "idle" && i.failNext.status === 200, short({ state: i.failIdleState, r: pick(i.failNext) }));

    const p = await ev(P, async (url, token, idleMs) => {
      const c = mk(url, token);
      await c.ready(5000);
      const first = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "a"));
      await sleep(idleMs * 2 + 1000);
      const r = { first, state: c.state, opens: c.opens, states: c._states.slice() };
      r.next = plain(await c.request("/api/local/dev/demo/echo/api/8/sys/echo", "b"));
      r.opensAfter = c.opens;
      c.close();
      return r;
    }, api(C), tok.echo, IDLE_MS);
    check(g, "router with client_ping_interval_ms: the browser answers pings, a quiet session outlives 2x idle_timeout_ms", p.state === "open" && p.opens === 1 && p.next.status === 200 && p.opensAfter === 1, short(p));

    // Router C has an app allowing "*": the upgrade from any origin succeeds, each request is checked by its app.
    const s = await ev(Q, async (url, token) => {
      const c = mk(url, token, { connectTimeoutMs: 3000 });
      const r = { ready: await c.ready(3000) };
      r.star = plain(await c.request("/api/local/dev/demo/star/api/1/sys/echo", "star"));
      r.echo = plain(await c.request("/api/local/dev/demo/echo/api/1/sys/echo", "echo"));
      r.opens = c.opens;
      c.close();
      return r;
    }, api(C), tok.star);
    check(g, 'app with allowed_origins ["*"]: a page on any origin opens /api/ws and is served by it', s.ready && s.star.status === 200 && s.star.body === "star", short({ ready: s.ready, star: pick(s.star) }));
    check(g, "...on that session, a request for an app that does not allow the origin: 403 origin_not_allowed (checked before the token)", s.echo.status === 403 && s.echo.error === "origin_not_allowed" && s.opens === 1, short({ echo: pick(s.echo), opens: s.opens }));
  });

  // ------------------------------------------------------------------------------------------
  await group("router restart", async (g) => {
    const apiR = api(R);
    await ev(P, async (url, token) => {
      window.rc = mk(url, token, { connectTimeoutMs: 20000 });
      await window.rc.ready(5000);
      window.rSlow = window.rc.request("/api/local/dev/demo/echo/api/0/sys/echo", "drain").then((r) => ({ r: plain(r), t: Date.now() }));
    }, apiR, tok.echo);
    await waitFor(() => P.evaluate(() => window.rc.inFlight === 1), "drain request in flight", 3000);
    await sleep(100);
    R.child.kill("SIGTERM");
    const d = await ev(P, async () => {
      const x = await window.rSlow;
      await until(() => window.rc.state !== "open", 5000);
      return { ...x, closedAt: Date.now(), state: window.rc.state, states: window.rc._states.slice() };
    });
    const closeCode = d.states.find((s) => s[0] === "waiting" || s[0] === "idle");
    check(g, "SIGTERM with a request in flight: it is answered 200 first, then the session closes 1001", d.r.status === 200 && d.r.body === "drain" && closeCode?.[1] === 1001, short({ r: pick(d.r), states: d.states }));
    const drainExit = await withTimeout(new Promise((r) => (R.child.exitCode !== null ? r(R.child.exitCode) : R.child.on("exit", (c) => r(c)))), 35000, "router R drain exit");
    check(g, "the draining router exits 0", drainExit === 0, `exit ${drainExit}`);

    // Requests queued while the router is down are sent once it is back.
    await ev(P, async () => {
      window.rQueued = window.rc.request("/api/local/dev/demo/echo/api/9/sys/echo", "queued-while-down").then(plain);
    });
    R = await startRouter(rCfg, "R");
    const reopened = await ev(P, async () => {
      const t0 = Date.now();
      const ok = await until(() => window.rc.state === "open" && window.rc.opens === 2, 15000);
      return { ok, ms: Date.now() - t0, opens: window.rc.opens, state: window.rc.state, queued: await window.rQueued };
    });
    check(g, "router restarted on the same address: the client reopens by itself (backoff capped at 5 s)", reopened.ok, short({ ...reopened, queued: pick(reopened.queued) }));
    check(
      g,
      "a request made while the router was down is delivered after the reopen (200, or 503 no_live_task before the task relinked), not a transport error",
      reopened.queued.status === 200 || (reopened.queued.status === 503 && reopened.queued.error === "no_live_task"),
      short(pick(reopened.queued)),
    );
    await waitRouted(R.api, "demo/echo", 0, tok.echo, 15000);
    await waitRouted(R.api, "demo/echo", 8, tok.echo, 15000);

    await ev(P, async () => {
      window.rSlow2At = Date.now();
      window.rSlow2State = window.rc.state;
      window.rSlow2 = window.rc.request("/api/local/dev/demo/echo/api/0/sys/echo", "killed").then((r) => ({ r: plain(r), t: Date.now() }));
    });
    await waitFor(() => P.evaluate(() => window.rc.inFlight === 1), "request in flight before SIGKILL", 3000).catch(async (e) => {
      throw new Error(e.message + ": " + short(await P.evaluate(async () => ({ state: window.rc.state, inFlight: window.rc.inFlight, states: window.rc._states, r: await Promise.race([window.rSlow2, sleep(10).then(() => "pending")]) }))));
    });
    const killedAt = Date.now();
    R.child.kill("SIGKILL");
    const k = await ev(P, async () => ({ ...(await window.rSlow2), sentAt: window.rSlow2At, stateAtSend: window.rSlow2State, states: window.rc._states.slice(-6) }));
    check(g, "SIGKILL with a request in flight: it resolves to disconnected at once", k.r.status === 0 && k.r.error === "disconnected" && k.t - killedAt < 500, short({ r: pick(k.r), answeredMsAfterKill: k.t - killedAt, sentMsBeforeKill: killedAt - k.sentAt, stateAtSend: k.stateAtSend, states: k.states.map((s) => [s[0], s[1], s[3] - killedAt]) }));
    const w = await ev(P, async () => {
      const ok = await until(() => window.rc.state === "waiting" || window.rc.state === "connecting", 2000);
      return { ok, state: window.rc.state, last: window.rc._states.slice(-4) };
    });
    check(g, "after the kill the client is backing off (waiting/connecting)", w.ok, short(w));
    R = await startRouter(rCfg, "R");
    await waitRouted(R.api, "demo/echo", 8, tok.echo, 15000);
    const again = await ev(P, async () => {
      const ok = await until(() => window.rc.state === "open" && window.rc.opens === 3, 15000);
      const r = plain(await window.rc.request("/api/local/dev/demo/echo/api/8/sys/echo", "third"));
      window.rc.close();
      return { ok, r, opens: window.rc.opens };
    });
    check(g, "second restart: reopened (opens 3), served", again.ok && again.r.status === 200 && again.r.body === "third", short(again));
  });
}

main()
  .then(async () => {
    await withTimeout(browser.close(), 5000, "closing Chromium").catch(() => {});
    const failed = rows.filter((r) => !r.ok);
    console.log(`${rows.length - failed.length} passed, ${failed.length} failed (${((Date.now() - T0) / 1000).toFixed(1)}s)`);
    for (const r of failed) console.log(`  FAILED [${r.group}] ${r.name}`);
    process.exit(failed.length ? 1 : 0);
  })
  .catch((e) => {
    console.error("edges: " + (e.stack || e));
    printLogs();
    process.exit(1);
  });
