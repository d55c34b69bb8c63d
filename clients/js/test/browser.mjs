#!/usr/bin/env node
// Browser test of the JavaScript client and of the router's CORS rules, in Debian's headless
// Chromium driven by puppeteer-core against a real router:
//
//   node clients/js/test/browser.mjs        (or clients/js/test/run.sh, which runs npm ci first)
//
// Env: FEDBUS_BIN (router binary; default target/release/fedbus under the repository root),
// CHROMIUM (default /usr/bin/chromium), FEDBUS_BROWSER_TIMEOUT_MS (whole run; default 60000).
//
// It starts a router in a temp FEDBUS_HOME whose app demo/echo allows one origin (a page
// served at http://127.0.0.1:<p1>) and not another (http://127.0.0.1:<p2>), an echo task, and a
// slow echo task (app demo/slow, for requests that are in flight when a socket drops). Each
// check is reported on its own; the exit code is 1 when any failed. The allowed page, showing
// every result, is saved as test/screenshot.png when all passed (test/screenshot-failed.png
// otherwise).
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
const BIN = process.env.FEDBUS_BIN ? path.resolve(process.env.FEDBUS_BIN) : path.join(ROOT, "target/release/fedbus");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_MS = Number(process.env.FEDBUS_BROWSER_TIMEOUT_MS || 60000);
const SLOW_DELAY_MS = 1500;
const N_CONCURRENT = 50;
const T0 = Date.now();

// ---- results ---------------------------------------------------------------------------------

const rows = [];
function check(group, name, ok, detail) {
  ok = Boolean(ok);
  rows.push({ group, name, ok, detail: String(detail ?? "") });
  const secs = ((Date.now() - T0) / 1000).toFixed(1);
  console.log(`${ok ? "PASS" : "FAIL"} [${group}] ${name}${detail ? " -- " + detail : ""} (${secs}s)`);
  return ok;
}
const short = (v) => {
  const s = typeof v === "string" ? v : JSON.stringify(v);
  return s && s.length > 300 ? s.slice(0, 300) + "…" : s;
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
      process.kill(-bp.pid, "SIGKILL"); // puppeteer starts Chromium in its own process group
    } catch {
      try {
        bp.kill("SIGKILL");
      } catch {
        // gone
      }
    }
  }
  for (const s of servers) s.closeAllConnections?.(), s.close();
  if (home) fs.rmSync(home, { recursive: true, force: true });
  home = null;
}
process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => {
    console.error(`browser test: ${sig}`);
    cleanup();
    process.exit(1);
  });
}
const overall = setTimeout(() => {
  const failed = rows.filter((r) => !r.ok).length;
  console.error(`browser test: over the ${TOTAL_MS} ms limit (${rows.length - failed} passed, ${failed} failed before it)`);
  printLogs();
  process.exit(1); // exit handler kills everything
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
    console.error(`---- last lines of ${f} ----\n${logTail(path.join(home, f))}`);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(cond, what, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}
function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, rej) => (t = setTimeout(() => rej(new Error(`${what}: no result within ${ms} ms`)), ms))),
  ]);
}

// ---- the router ------------------------------------------------------------------------------

function fedbus(args) {
  return execFileSync(BIN, args, { env: { ...process.env, FEDBUS_HOME: home }, stdio: ["ignore", "pipe", "pipe"] })
    .toString()
    .trim();
}

function routerConfig({ allowed, cors }) {
  const keys = path.join(home, "keys");
  let c = `region = "local"
cluster = "dev"
keyring = ${JSON.stringify(keys)}
[listen]
api = "127.0.0.1:0"
internal = "127.0.0.1:0"
admin = "127.0.0.1:0"
[tuning]
shard_cores = [0]
pin = false
[[apps]]
name = "demo/echo"
partitions = 16
`;
  if (cors) {
    c += `[apps.cors]
allowed_origins = [${JSON.stringify(allowed)}]
allowed_headers = ["authorization", "content-type"]
max_age_secs = 600
allow_credentials = false
`;
  }
  // Two more apps, allowing the same origin with the default headers and max age: demo/other
  // (a token of demo/echo used for it is refused as wrong_app, not for its origin) and
  // demo/slow (served by a task that answers late).
  for (const name of ["demo/other", "demo/slow"]) {
    c += `[[apps]]\nname = "${name}"\npartitions = 4\n`;
    if (cors) c += `[apps.cors]\nallowed_origins = [${JSON.stringify(allowed)}]\n`;
  }
  return c;
}

/** Starts `fedbus run`; resolves to the parsed ready line, or to {error} when it exits first. */
async function startRouter(cfgText, tag) {
  const cfg = path.join(home, `router-${tag}.toml`);
  fs.writeFileSync(cfg, cfgText);
  const log = path.join(home, `router-${tag}.log`);
  const child = spawn(BIN, ["run", "--config", cfg], {
    env: { ...process.env, FEDBUS_HOME: home, FEDBUS_LOG: "info" },
    stdio: ["ignore", "pipe", fs.openSync(log, "w")],
  });
  children.add(child);
  const lines = readline.createInterface({ input: child.stdout });
  const ready = new Promise((resolve) => {
    lines.on("line", (l) => {
      if (l.startsWith("fedbus-ready ")) resolve(JSON.parse(l.slice("fedbus-ready ".length)));
    });
    child.on("exit", (code) => resolve({ error: `exited with ${code}: ${logTail(log, 5)}` }));
  });
  const r = await withTimeout(ready, 10000, "router ready line");
  if (r.error) children.delete(child);
  return { ...r, child, log };
}

/** Starts a `fedbus task echo` and waits until the router logged its link's registration. */
async function startTask(router, app, partitions, extra = []) {
  const log = path.join(home, `task-${app.replace("/", "-")}.log`);
  const registered = () => (fs.readFileSync(router.log, "utf8").match(/task link registered/g) || []).length;
  const before = registered();
  const child = spawn(
    BIN,
    ["task", "echo", "--app", app, "--partitions", partitions, "--router", router.internal[0], "--keyring", path.join(home, "keys"), ...extra],
    { env: { ...process.env, FEDBUS_HOME: home, FEDBUS_LOG: "info" }, stdio: ["ignore", "ignore", fs.openSync(log, "w")] },
  );
  children.add(child);
  await waitFor(() => child.exitCode === null && registered() >= before + router.internal.length, `${app} task registered`);
  return child;
}

/** An HTTP request from node (no browser): {status, headers, body} or {error}. */
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

/** The status line and headers the router answers to a websocket upgrade of /api/ws. */
function upgradeHead(api, token, origin) {
  return new Promise((resolve) => {
    const [host, port] = [api.slice(0, api.lastIndexOf(":")), Number(api.slice(api.lastIndexOf(":") + 1))];
    const s = net.connect(port, host);
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
      if (end >= 0) done({ head: buf.slice(0, end), status: Number(buf.split(" ")[1]), rest: buf.slice(end + 4) });
    });
    s.on("connect", () => {
      s.write(
        `GET /api/ws?access_token=${token} HTTP/1.1\r\nHost: ${api}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
          `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n` +
          (origin ? `Origin: ${origin}\r\n` : "") +
          "\r\n",
      );
    });
  });
}

async function metricValue(admin, series) {
  const r = await httpRequest("GET", `http://${admin}/metrics`);
  if (r.error) return NaN;
  const line = r.body.split("\n").find((l) => l.startsWith(series + " "));
  return line ? Number(line.split(" ").pop()) : 0;
}

// ---- the pages' server -------------------------------------------------------------------------

async function pageServer() {
  const files = {
    "/": ["page.html", "text/html; charset=utf-8", HERE],
    "/page.mjs": ["page.mjs", "text/javascript; charset=utf-8", HERE],
    "/fedbus.js": ["fedbus.js", "text/javascript; charset=utf-8", CLIENT_DIR],
  };
  const s = http.createServer((req, res) => {
    const f = files[new URL(req.url, "http://x").pathname];
    if (!f || req.method !== "GET") {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": f[1], "cache-control": "no-store" }).end(fs.readFileSync(path.join(f[2], f[0])));
  });
  servers.push(s);
  s.listen(0, "127.0.0.1");
  await once(s, "listening");
  return `http://127.0.0.1:${s.address().port}`;
}

// ---- the test ----------------------------------------------------------------------------------

async function main() {
  if (!fs.existsSync(BIN)) throw new Error(`no router binary at ${BIN}: build it or set FEDBUS_BIN`);
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install -y chromium, or set CHROMIUM`);
  const { default: puppeteer } = await import("puppeteer-core");
  home = fs.mkdtempSync(path.join(os.tmpdir(), "fedbus-browser-"));
  console.log(`router binary ${BIN}; home ${home}`);

  const allowed = await pageServer();
  const disallowed = await pageServer();
  fedbus(["keys", "init", "--keyring", path.join(home, "keys"), "--app", "demo/echo", "--app", "demo/other", "--app", "demo/slow"]);

  // A router with [apps.cors]; one without if this binary refuses the section (so the client
  // checks still run and report on their own).
  let router = await startRouter(routerConfig({ allowed, cors: true }), "cors");
  const corsOk = check("router", "accepts [apps.cors] in its config", !router.error, router.error || `allowed origin ${allowed}`);
  if (!corsOk) router = await startRouter(routerConfig({ allowed, cors: false }), "plain");
  if (router.error) throw new Error("router did not start: " + router.error);
  const api = `http://${router.api}`;
  console.log(`router api ${api}; allowed origin ${allowed}; disallowed origin ${disallowed}`);

  await startTask(router, "demo/echo", "0-15");
  // Role auth serves the anonymous service `auth` (no token needed on HTTP).
  await startTask(router, "demo/echo", "0-15", ["--role", "auth"]);
  await startTask(router, "demo/slow", "0-3", ["--delay-ms", String(SLOW_DELAY_MS)]);
  const token = fedbus(["token", "client", "--app", "demo/echo", "--sub", "alice", "--keyring", path.join(home, "keys")]);
  const slowToken = fedbus(["token", "client", "--app", "demo/slow", "--sub", "alice", "--keyring", path.join(home, "keys")]);
  const echoUrl = (wsid) => `${api}/api/local/dev/demo/echo/api/${wsid}/sys/echo`;
  const auth = { authorization: `Bearer ${token}`, "content-type": "text/plain" };
  // Routed: a request is answered 200 (503 until the routing table has the task).
  await waitFor(async () => (await httpRequest("POST", echoUrl(42), auth, "probe")).status === 200, "echo task routed");
  await waitFor(
    async () => (await httpRequest("POST", `${api}/api/local/dev/demo/echo/auth/7/sys/echo`, {}, "probe")).status === 200,
    "auth-role echo task routed (anonymous service auth)",
  );
  await waitFor(async () => {
    const r = await httpRequest("POST", `${api}/api/local/dev/demo/slow/api/0/sys/echo`, { authorization: `Bearer ${slowToken}` }, "p", 300);
    return r.status === 200 || r.error === "timeout"; // no quick 503: a task holds it
  }, "slow task routed");

  // -- the router's CORS answers, from node (no browser involved) --
  {
    const g = "router (node)";
    const pre = await httpRequest("OPTIONS", echoUrl(42), {
      origin: allowed,
      "access-control-request-method": "POST",
      "access-control-request-headers": "authorization,content-type",
    });
    const h = pre.headers || {};
    check(
      g,
      "preflight from the allowed origin: 204 with Allow-Origin/Methods/Headers, Max-Age, Vary",
      pre.status === 204 &&
        h["access-control-allow-origin"] === allowed &&
        /\bPOST\b/i.test(h["access-control-allow-methods"] || "") &&
        /\bauthorization\b/i.test(h["access-control-allow-headers"] || "") &&
        /\bcontent-type\b/i.test(h["access-control-allow-headers"] || "") &&
        h["access-control-max-age"] === "600" &&
        /\borigin\b/i.test(h["vary"] || ""),
      short({ status: pre.status, error: pre.error, headers: pickAccess(h) }),
    );
    const body = "node " + Math.random();
    const post = await httpRequest("POST", echoUrl(42), { ...auth, origin: allowed }, body);
    const ph = post.headers || {};
    check(
      g,
      "POST from the allowed origin: 200, echoed, Allow-Origin, Vary, fedbus-* exposed",
      post.status === 200 &&
        post.body === body &&
        ph["access-control-allow-origin"] === allowed &&
        /\borigin\b/i.test(ph["vary"] || "") &&
        /\bfedbus-partition\b/i.test(ph["access-control-expose-headers"] || "") &&
        /\bfedbus-hops\b/i.test(ph["access-control-expose-headers"] || ""),
      short({ status: post.status, error: post.error, headers: pickAccess(ph) }),
    );
    const before200 = await metricValue(router.admin, 'fedbus_requests_total{status="200"}');
    const bad = await httpRequest("POST", echoUrl(42), { ...auth, origin: disallowed }, "x");
    let j = {};
    try {
      j = JSON.parse(bad.body);
    } catch {
      // not JSON
    }
    const after200 = await metricValue(router.admin, 'fedbus_requests_total{status="200"}');
    check(
      g,
      "POST from a disallowed origin: 403 origin_not_allowed, no Allow-Origin, task not reached",
      bad.status === 403 && j.error === "origin_not_allowed" && !bad.headers["access-control-allow-origin"] && after200 === before200,
      short({ status: bad.status, error: bad.error ?? j.error, acao: bad.headers?.["access-control-allow-origin"], served200: after200 - before200 }),
    );
    const preBad = await httpRequest("OPTIONS", echoUrl(42), { origin: disallowed, "access-control-request-method": "POST" });
    check(
      g,
      "preflight from a disallowed origin: no Allow-Origin",
      !preBad.error && !preBad.headers["access-control-allow-origin"] && preBad.status !== 204 && preBad.status >= 400,
      short({ status: preBad.status, error: preBad.error, headers: pickAccess(preBad.headers || {}) }),
    );
    const none = await httpRequest("POST", echoUrl(42), auth, "no origin");
    check(g, "POST without Origin: unaffected (200, echoed)", none.status === 200 && none.body === "no origin", short({ status: none.status }));
    const upBad = await upgradeHead(router.api, token, disallowed);
    check(g, "/api/ws upgrade from a disallowed origin: 403 before the 101", upBad.status === 403, short(upBad.head || upBad.error));
    const upOk = await upgradeHead(router.api, token, allowed);
    check(g, "/api/ws upgrade from the allowed origin: 101", upOk.status === 101, short(upOk.head || upOk.error));
  }

  // -- Chromium --
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"],
    timeout: 15000,
    userDataDir: path.join(home, "chromium-profile"), // removed with the temp dir, also on failure
  });
  const open = async (origin) => {
    const page = await browser.newPage();
    await page.setViewport({ width: 1200, height: 900 });
    const net = { sockets: [], responses: [], failures: [] };
    const cdp = await page.createCDPSession();
    await cdp.send("Network.enable");
    cdp.on("Network.webSocketCreated", (e) => net.sockets.push(e.url));
    cdp.on("Network.responseReceived", (e) => net.responses.push({ id: e.requestId, url: e.response.url, status: e.response.status }));
    cdp.on("Network.loadingFailed", (e) => net.failures.push({ id: e.requestId, error: e.errorText, cors: e.corsErrorStatus?.corsError }));
    page.on("pageerror", (e) => console.error(`page error (${origin}): ${e.message}`));
    await page.goto(origin + "/", { waitUntil: "load", timeout: 10000 });
    await page.waitForFunction("window.fedbusTestReady === true", { timeout: 5000 });
    return { page, net };
  };
  const call = (page, fn, ...args) =>
    withTimeout(page.evaluate((fn, args) => window.fedbusTest[fn](...args), fn, args), 15000, fn);

  const A = await open(allowed);
  {
    const g = "allowed origin";
    const f = await call(A.page, "fetchEcho", api, token, 42);
    check(
      g,
      "fetch POST with Bearer: 200, body and fedbus-* headers readable",
      !f.threw &&
        f.status === 200 &&
        f.body === f.sent &&
        f.headers["fedbus-partition"] === String(42 % 16) &&
        /^\d+$/.test(f.headers["fedbus-shard"] ?? "") &&
        f.headers["fedbus-hops"] === "0",
      short(f.threw ? `${f.name}: ${f.message}` : { status: f.status, headers: f.headers }),
    );
    const n = await call(A.page, "fetchNoToken", api);
    let nj = {};
    try {
      nj = JSON.parse(n.body);
    } catch {
      // not JSON
    }
    check(
      g,
      "fetch without a token: the router's 401 JSON is readable",
      !n.threw && n.status === 401 && typeof nj.error === "string" && nj.status === 401,
      short(n.threw ? `${n.name}: ${n.message}` : { status: n.status, body: n.body }),
    );

    const socketsBefore = A.net.sockets.length;
    const m = await call(A.page, "clientMany", api, token, N_CONCURRENT);
    const mismatched = m.answers.filter((a) => a.status !== 200 || a.body !== a.sentBody || a.partition !== String(a.wsid % 16));
    check(
      g,
      `client: ${N_CONCURRENT} concurrent requests over one websocket, every answer matches`,
      m.ready && m.inFlightAfterSend === N_CONCURRENT && m.answers.length === N_CONCURRENT && mismatched.length === 0 && m.sockets === 1 && m.opens === 1 && A.net.sockets.length - socketsBefore === 1,
      short({ ready: m.ready, inFlight: m.inFlightAfterSend, answers: m.answers.length, bad: mismatched.slice(0, 2), sockets: m.sockets, cdpSockets: A.net.sockets.length - socketsBefore }),
    );
  }
  {
    const g = "allowed origin";
    const e = await call(A.page, "clientErrors", api, token);
    const nothingThrew = ["status404", "wrongApp", "badPath", "json", "badHeader"].every((k) => e[k] && !e[k].threw);
    check(
      g,
      "client: non-2xx answers are values (task 404, router 403 wrong_app, 400 bad_wsid)",
      e.ready &&
        nothingThrew &&
        e.status404.status === 404 && e.status404.error === "http_404" && e.status404.ok === false &&
        e.wrongApp.status === 403 && e.wrongApp.error === "wrong_app" && typeof e.wrongApp.message === "string" &&
        e.badPath.status === 400 && e.badPath.error === "bad_wsid",
      short({ status404: pick(e.status404), wrongApp: pick(e.wrongApp), badPath: pick(e.badPath) }),
    );
    check(
      g,
      "client: JSON body round trip; a header /api/ws cannot carry is a bad_request value",
      nothingThrew &&
        e.json.status === 200 && e.json.headers["content-type"] === "application/json" &&
        e.json.json?.hello === "json" && e.json.json?.n === 5 &&
        e.badHeader.status === 0 && e.badHeader.error === "bad_request",
      short({ json: pick(e.json), badHeader: pick(e.badHeader) }),
    );
    check(
      g,
      "client: a request's method reaches the task; a null token opens an anonymous session (401 missing_token per request)",
      e.put?.status === 200 && e.put.headers["echo-method"] === "PUT" &&
        e.anonReady === true && e.anon?.status === 401 && e.anon.error === "missing_token",
      short({ put: pick(e.put), anonReady: e.anonReady, anon: pick(e.anon) }),
    );

    const socketsBefore = A.net.sockets.length;
    const d = await call(A.page, "clientDrop", api, slowToken);
    check(
      g,
      "client: requests in flight when the socket drops resolve to a transport error",
      d.ready && d.inFlight === 3 && d.dropped.length === 3 && d.dropped.every((r) => r.status === 0 && r.error === "disconnected"),
      short({ inFlight: d.inFlight, dropped: d.dropped.map(pick), states: d.states }),
    );
    check(
      g,
      "client: reconnects with backoff; the next request is served on the new socket",
      d.after.status === 200 && d.after.body === d.body && d.sockets === 2 && d.opens === 2 && A.net.sockets.length - socketsBefore === 2 &&
        d.states.includes("waiting 1003"),
      short({ after: pick(d.after), ms: d.ms, sockets: d.sockets, opens: d.opens, states: d.states }),
    );
  }

  // -- the page on the origin that is not allowed --
  const B = await open(disallowed);
  {
    const g = "disallowed origin";
    const f = await call(B.page, "fetchEcho", api, token, 42);
    // DevTools says why it failed: a CORS error (not, say, a refused connection).
    const why = await waitFor(() => B.net.failures.find((x) => x.cors), "DevTools CORS error of the fetch", 3000).catch(() => null);
    check(
      g,
      "fetch POST with Bearer fails (TypeError, a CORS error), nothing readable",
      f.threw && f.name === "TypeError" && why?.cors,
      short(f.threw ? `${f.name}: ${f.message}; DevTools: ${JSON.stringify(why ?? B.net.failures)}` : f),
    );

    // A simple request needs no preflight and reaches the router; the page cannot read the
    // answer, DevTools can: the router must refuse it (403) without serving it (no 200).
    const marker = Math.random().toString(36).slice(2);
    const before200 = await metricValue(router.admin, 'fedbus_requests_total{status="200"}');
    const nc = await call(B.page, "fetchNoCors", api, marker);
    const seen = await waitFor(() => B.net.responses.find((r) => r.url.includes("m=" + marker)) || B.net.failures.find(() => false), "DevTools response of the no-cors request", 5000).catch(() => null);
    const after200 = await metricValue(router.admin, 'fedbus_requests_total{status="200"}');
    check(
      g,
      "no-cors POST to an anonymous service: refused by the router (403), not served",
      !nc.threw && nc.type === "opaque" && seen?.status === 403 && after200 === before200,
      short({ page: nc, routerStatus: seen?.status, served200: after200 - before200 }),
    );

    const ws = await call(B.page, "rawWebSocket", api, token, 5000);
    check(g, "a bare WebSocket to /api/ws does not open", ws.closed && !ws.opened, short(ws));
    const c = await call(B.page, "clientOnce", api, token, 1500);
    check(
      g,
      "client: never opens, retries with exponential backoff; a request resolves to transport error not_connected",
      c.ready === false && c.opens === 0 && c.status === 0 && c.error === "not_connected" &&
        c.waits.length >= 4 && c.waits.slice(0, 4).join() === "50,100,200,400" && c.waits.slice(4).every((w) => w === 400),
      short({ ...pick(c), waits: c.waits }),
    );
  }
  {
    // The same client and WebSocket from the allowed page work (so the two checks above fail
    // for the origin, not for the client).
    const g = "allowed origin";
    const ws = await call(A.page, "rawWebSocket", api, token, 5000);
    const c = await call(A.page, "clientOnce", api, token, 5000);
    check(
      g,
      "the same bare WebSocket and client call succeed here",
      ws.opened && c.ready === true && c.status === 200 && c.body === "from " + allowed,
      short({ ws, client: pick(c) }),
    );
  }

  // -- the screenshot: every result, on the allowed page --
  const failed = rows.filter((r) => !r.ok).length;
  const title = `${path.basename(BIN)}, Chromium ${(await browser.version()).replace(/^[^/]*\//, "")}, ${new Date().toISOString().slice(0, 19)}Z`;
  await A.page.evaluate((rows, title) => window.fedbusTest.render(rows, title), rows, title);
  const shot = path.join(HERE, failed ? "screenshot-failed.png" : "screenshot.png");
  await A.page.bringToFront();
  const height = await A.page.evaluate(() => document.documentElement.scrollHeight);
  await A.page.setViewport({ width: 1200, height: Math.min(4000, height) });
  await A.page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${path.relative(process.cwd(), shot)}`);
}

function pick(r) {
  if (!r) return r;
  const o = { status: r.status, error: r.error };
  if (r.message) o.message = r.message;
  if (r.threw) o.threw = true;
  return o;
}

function pickAccess(h) {
  const o = {};
  for (const [k, v] of Object.entries(h)) if (k.startsWith("access-control-") || k === "vary") o[k] = v;
  return o;
}

main()
  .then(async () => {
    await withTimeout(browser.close(), 5000, "closing Chromium").catch(() => {});
    const failed = rows.filter((r) => !r.ok).length;
    console.log(`${rows.length - failed} passed, ${failed} failed`);
    process.exit(failed ? 1 : 0);
  })
  .catch((e) => {
    console.error("browser test: " + (e.stack || e));
    printLogs();
    process.exit(1);
  });
