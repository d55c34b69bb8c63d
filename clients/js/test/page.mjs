// The browser side of test/browser.mjs: each function does one thing in the page (a fetch, a
// batch of client requests, a websocket) and returns what it saw; browser.mjs judges it.
import { connect } from "/fedbus.js";

document.getElementById("where").textContent = "page origin " + location.origin;

const rnd = () => Math.random().toString(36).slice(2, 10);
const echoPath = (app, service, wsid) => `/api/local/dev/${app}/${service}/${wsid}/sys/echo`;

/** A WebSocket subclass that counts the sockets a client opens and keeps them. */
function countingWebSocket() {
  const sockets = [];
  class Counting extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return { Counting, sockets };
}

function fedbusHeaders(h) {
  const out = {};
  for (const name of ["fedbus-partition", "fedbus-shard", "fedbus-hops", "fedbus-served-by", "content-type"]) {
    out[name] = h.get(name);
  }
  return out;
}

function plain(r) {
  return { status: r.status, ok: r.ok, error: r.error, message: r.message, headers: r.headers, body: r.text() };
}

window.fedbusTest = {
  /** fetch POST with a Bearer token (triggers a CORS preflight). */
  async fetchEcho(router, token, wsid) {
    const sent = `fetch from ${location.origin} ${rnd()}`;
    try {
      const r = await fetch(router + echoPath("demo/echo", "api", wsid), {
        method: "POST",
        headers: { Authorization: "Bearer " + token, "Content-Type": "text/plain" },
        body: sent,
      });
      return { threw: false, status: r.status, sent, body: await r.text(), headers: fedbusHeaders(r.headers) };
    } catch (e) {
      return { threw: true, name: e.name, message: e.message };
    }
  },

  /** fetch POST without a token: a router-made 401 the page should be able to read. */
  async fetchNoToken(router) {
    try {
      const r = await fetch(router + echoPath("demo/echo", "api", 1), {
        method: "POST",
        headers: { "Content-Type": "text/plain" },
        body: "x",
      });
      return { threw: false, status: r.status, body: await r.text() };
    } catch (e) {
      return { threw: true, name: e.name, message: e.message };
    }
  },

  /** A "simple" request (no preflight) to an anonymous service; the page cannot read it. */
  async fetchNoCors(router, marker) {
    try {
      const r = await fetch(router + echoPath("demo/echo", "auth", 7) + "?m=" + marker, {
        method: "POST",
        mode: "no-cors",
        headers: { "Content-Type": "text/plain" },
        body: "no-cors " + marker,
      });
      return { threw: false, type: r.type, status: r.status };
    } catch (e) {
      return { threw: true, name: e.name, message: e.message };
    }
  },

  /** `n` requests at once through one client; every answer with what was sent. */
  async clientMany(router, token, n) {
    const { Counting, sockets } = countingWebSocket();
    const c = connect(router, token, { WebSocket: Counting });
    try {
      const ready = await c.ready(5000);
      const sent = [];
      const ps = [];
      for (let i = 0; i < n; i++) {
        const wsid = 1000 + i;
        const body = `req ${i} ${rnd()}`;
        sent.push({ wsid, body });
        ps.push(c.request(echoPath("demo/echo", "api", wsid), body, { "content-type": "text/plain" }));
      }
      const inFlightAfterSend = c.inFlight;
      const rs = await Promise.all(ps);
      return {
        ready,
        inFlightAfterSend,
        sockets: sockets.length,
        opens: c.opens,
        answers: rs.map((r, i) => ({ wsid: sent[i].wsid, sentBody: sent[i].body, ...plain(r), partition: r.headers["fedbus-partition"] })),
      };
    } finally {
      c.close();
    }
  },

  /** Non-2xx answers and bad requests come back as values; nothing throws. */
  async clientErrors(router, token) {
    const c = connect(router, token);
    const out = {};
    try {
      out.ready = await c.ready(5000);
      const tries = {
        status404: () => c.request("/api/local/dev/demo/echo/api/3/status/404", ""),
        wrongApp: () => c.request(echoPath("demo/other", "api", 3), "x"),
        badPath: () => c.request("/api/local/dev/demo/echo/api/notanumber/sys/echo", "x"),
        json: () => c.request(echoPath("demo/echo", "api", 5), { hello: "json", n: 5 }),
        badHeader: () => c.request(echoPath("demo/echo", "api", 5), "x", { "x-custom": "1" }),
        put: () => c.request(echoPath("demo/echo", "api", 6), "p", {}, { method: "PUT" }),
      };
      for (const [k, f] of Object.entries(tries)) {
        try {
          const r = await f();
          out[k] = { threw: false, ...plain(r), json: r.json() };
        } catch (e) {
          out[k] = { threw: true, message: String(e) };
        }
      }
      // An anonymous session (no token): the upgrade is accepted, and a service that is not
      // anonymous answers 401 missing_token per request.
      const anon = connect(router, null, { whileDisconnected: "fail" });
      try {
        out.anonReady = await anon.ready(5000);
        out.anon = plain(await anon.request(echoPath("demo/echo", "api", 7), "a"));
      } finally {
        anon.close();
      }
      return out;
    } finally {
      c.close();
    }
  },

  /**
   * Requests in flight when the socket drops resolve to `disconnected`; the client reconnects
   * and the next request is served. The drop: a text message, which the router answers by
   * closing with 1003 (PROTOCOL.md section 8); the slow app's task answers after a delay, so
   * the requests are still in flight then.
   */
  async clientDrop(router, slowToken) {
    const { Counting, sockets } = countingWebSocket();
    const states = [];
    const c = connect(router, slowToken, {
      WebSocket: Counting,
      backoff: { initialMs: 50, maxMs: 1000 },
      onState: (s, info) => states.push(s + (info.code ? " " + info.code : "")),
    });
    try {
      const ready = await c.ready(5000);
      const ps = [0, 1, 2].map((i) => c.request(echoPath("demo/slow", "api", i), "slow " + i));
      const inFlight = c.inFlight;
      sockets[0].send("not a frame");
      const dropped = (await Promise.all(ps)).map(plain);
      const body = "after reconnect " + rnd();
      const t0 = performance.now();
      const after = plain(await c.request(echoPath("demo/slow", "api", 1), body));
      return { ready, inFlight, dropped, body, after, ms: Math.round(performance.now() - t0), sockets: sockets.length, opens: c.opens, states };
    } finally {
      c.close();
    }
  },

  /** A bare WebSocket to /api/ws: does it open? */
  rawWebSocket(router, token, ms) {
    return new Promise((resolve) => {
      const u = router.replace(/^http/, "ws") + "/api/ws?access_token=" + encodeURIComponent(token);
      let opened = false;
      const ws = new WebSocket(u);
      const t = setTimeout(() => {
        ws.close();
        resolve({ opened, closed: false });
      }, ms);
      ws.onopen = () => {
        opened = true;
        ws.close(1000);
      };
      ws.onclose = (e) => {
        clearTimeout(t);
        resolve({ opened, closed: true, code: e.code });
      };
    });
  },

  /** The client from this page: ready() and a request. */
  async clientOnce(router, token, ms) {
    const waits = [];
    const c = connect(router, token, {
      connectTimeoutMs: ms,
      backoff: { initialMs: 50, maxMs: 400, jitter: 0 },
      onState: (s, info) => s === "waiting" && waits.push(info.delay),
    });
    try {
      const ready = await c.ready(ms);
      const r = await c.request(echoPath("demo/echo", "api", 9), "from " + location.origin);
      return { ready, opens: c.opens, waits, ...plain(r) };
    } finally {
      c.close();
    }
  },

  /** Shows the results table. */
  render(rows, title) {
    const tbody = document.getElementById("rows");
    tbody.textContent = "";
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.className = r.ok ? "pass" : "fail";
      for (const [cls, text] of [
        ["group", r.group],
        ["name", r.name],
        ["res", r.ok ? "PASS" : "FAIL"],
        ["detail", r.detail],
      ]) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = text;
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
    const failed = rows.filter((r) => !r.ok).length;
    document.getElementById("summary").textContent = `${rows.length - failed} passed, ${failed} failed — ${title}`;
  },
};
window.fedbusTestReady = true;
