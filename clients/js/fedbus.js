// fedbus JavaScript client for the client websocket endpoint `GET /api/ws`
// (docs/PROTOCOL.md, sections 5 and 8). An ES module without dependencies: import it as it
// is in a browser (`import { connect } from "./fedbus.js"`) or in any runtime that has a
// WHATWG `WebSocket` (or pass one in `options.WebSocket`).
//
// Errors are values: `request()` never rejects. A non-2xx answer resolves to a response with
// `ok === false` and `error` set; a transport failure resolves to one with `status === 0`
// and `error` one of the TRANSPORT_ERRORS codes.

/** Frame kinds (PROTOCOL.md section 5). */
export const Kind = Object.freeze({ Request: 1, Response: 2, Redirect: 3, SecretPush: 4 });

/** Metadata tags (PROTOCOL.md section 5). */
export const Tag = Object.freeze({
  APP: 1,
  ROLE: 2,
  SERVICE: 3,
  MODULE: 4,
  FUNCTION: 5,
  WSID: 6,
  METHOD: 7,
  CLUSTER: 8,
  CONTENT_TYPE: 9,
  SUBJECT: 10,
  STATUS: 16,
  HEADER: 17,
  PARTITION: 18,
  VERSION: 19,
  ERROR: 20,
  SERVED_BY: 21,
  HOPS: 22,
  EMERGENCY_FOR: 23,
  PATH: 24,
  TOKEN: 25,
});

/** Magic byte, also the protocol version. */
export const MAGIC = 0xfb;
/** Bytes of the fixed frame header. */
export const HEADER_LEN = 24;
/** Largest metadata value (u16 length). */
export const MAX_META_VALUE = 0xffff;

/**
 * Codes of the transport errors (status 0) a request can resolve to:
 * - `disconnected`: the socket closed while the request was in flight (it may or may not
 *   have been served);
 * - `not_connected`: no open socket within `connectTimeoutMs` (or at once with
 *   `whileDisconnected: "fail"`); the request was never sent;
 * - `timeout`: no answer within the request's timeout (a late answer is ignored; the request
 *   keeps its `maxInFlight` slot until that answer, or the router's 504, comes, for at most
 *   `lateAnswerMs` after it was sent);
 * - `closed`: `close()` was called before the answer came;
 * - `bad_request`: the client refused to send it: a path that does not start with `/api/`, a
 *   method other than GET/POST/PUT/PATCH/DELETE, a header other than `content-type`, a body of
 *   another type (not a string, buffer, nothing, plain object or array), a value over 65535
 *   bytes; never sent.
 */
export const TRANSPORT_ERRORS = Object.freeze([
  "disconnected",
  "not_connected",
  "timeout",
  "closed",
  "bad_request",
]);

const te = new TextEncoder();
const td = new TextDecoder();

/** Bytes of a request body: string (UTF-8), ArrayBuffer, any ArrayBufferView, or nothing. */
export function bodyBytes(body) {
  if (body === undefined || body === null) return new Uint8Array(0);
  if (typeof body === "string") return te.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer || Object.prototype.toString.call(body) === "[object ArrayBuffer]") {
    return new Uint8Array(body); // also an ArrayBuffer of another realm (an iframe, a worker's)
  }
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  throw new TypeError("body must be a string, an ArrayBuffer, a typed array or a DataView");
}

/**
 * Whether `request()` sends `body` as JSON: a plain object (its prototype is `Object.prototype`,
 * of any realm, or null) or an array. Any other object (Blob, File, FormData, URLSearchParams,
 * Map, Date, a class instance, ...) is not JSON-encoded: `bodyBytes` refuses it.
 */
function isJsonBody(body) {
  if (body === null || typeof body !== "object") return false;
  if (Array.isArray(body)) return true;
  const proto = Object.getPrototypeOf(body);
  return proto === null || Object.getPrototypeOf(proto) === null;
}

/** The methods a request on `/api/ws` may carry (PROTOCOL.md section 8). */
const METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/**
 * Encodes a client Request frame: kind 1, flags/hops/partition 0, `id` as request_id,
 * metadata PATH, (when given and not POST) METHOD and (when given) CONTENT_TYPE, payload `body`.
 * @param {number} id non-negative integer up to 2^53-1
 * @param {string} path `/api/<region>/<cluster>/<owner>/<app>/<service>/<wsid>/<module>/<function>`
 * @param {Uint8Array} body
 * @param {string} [contentType]
 * @param {string} [method] GET, POST, PUT, PATCH or DELETE (absent: POST)
 * @returns {Uint8Array}
 */
export function encodeRequest(id, path, body, contentType, method) {
  if (!Number.isSafeInteger(id) || id < 0) throw new RangeError("request id must be a safe non-negative integer");
  const entries = [[Tag.PATH, te.encode(path)]];
  if (method !== undefined && method !== null && method !== "POST") entries.push([Tag.METHOD, te.encode(method)]);
  if (contentType !== undefined && contentType !== null) entries.push([Tag.CONTENT_TYPE, te.encode(contentType)]);
  let metaLen = 0;
  for (const [, v] of entries) {
    if (v.length > MAX_META_VALUE) throw new RangeError("metadata value over 65535 bytes");
    metaLen += 3 + v.length;
  }
  const out = new Uint8Array(HEADER_LEN + metaLen + body.length);
  const dv = new DataView(out.buffer);
  out[0] = MAGIC;
  out[1] = Kind.Request;
  // flags, hops, partition: 0
  dv.setUint32(8, Math.floor(id / 0x100000000));
  dv.setUint32(12, id >>> 0);
  dv.setUint32(16, metaLen);
  dv.setUint32(20, body.length);
  let o = HEADER_LEN;
  for (const [t, v] of entries) {
    out[o] = t;
    dv.setUint16(o + 1, v.length);
    out.set(v, o + 3);
    o += 3 + v.length;
  }
  out.set(body, o);
  return out;
}

/**
 * Decodes one fedbus frame (one binary websocket message). Throws an Error on a malformed
 * frame (bad magic, unknown kind, lengths that do not add up, a metadata entry that runs
 * past the end).
 * @param {ArrayBuffer|Uint8Array} data
 */
export function decodeFrame(data) {
  const b = data instanceof Uint8Array ? data : new Uint8Array(data);
  if (b.length < HEADER_LEN) throw new Error("frame shorter than its header");
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (b[0] !== MAGIC) throw new Error("bad magic");
  const kind = b[1];
  if (kind < 1 || kind > 4) throw new Error("unknown kind " + kind);
  const hi = dv.getUint32(8);
  const lo = dv.getUint32(12);
  const metaLen = dv.getUint32(16);
  const payloadLen = dv.getUint32(20);
  if (HEADER_LEN + metaLen + payloadLen !== b.length) throw new Error("frame length mismatch");
  const meta = [];
  let o = HEADER_LEN;
  const end = HEADER_LEN + metaLen;
  while (o < end) {
    if (o + 3 > end) throw new Error("metadata entry header runs past the end");
    const tag = b[o];
    const len = dv.getUint16(o + 1);
    if (o + 3 + len > end) throw new Error("metadata entry runs past the end");
    meta.push({ tag, value: b.subarray(o + 3, o + 3 + len) });
    o += 3 + len;
  }
  return {
    kind,
    flags: b[2],
    hops: b[3],
    partition: dv.getUint32(4),
    // Ids above 2^53 are not ours (we never send them); they lose precision harmlessly.
    requestId: hi * 0x100000000 + lo,
    meta,
    payload: b.subarray(end),
  };
}

/** An answer: what the router or the task said, or a transport error (status 0). */
export class FedbusResponse {
  constructor(status, headers, body, error, message, requestId) {
    /** HTTP status; 0 for a transport error. */
    this.status = status;
    /** Response headers, names lower-case; repeated names joined with ", ". */
    this.headers = headers;
    /** The body. */
    this.body = body;
    /** null on 2xx; else the router's error code, `http_<status>` for a task's non-2xx, or a transport error code. */
    this.error = error;
    /** Human-readable detail of the error (the router's JSON `message`), or null. */
    this.message = message;
    /** The request id the client used (null when never sent). */
    this.requestId = requestId;
  }
  /** True for a 2xx answer. */
  get ok() {
    return this.status >= 200 && this.status < 300;
  }
  /** True when the request failed in transport (status 0). */
  get transport() {
    return this.status === 0;
  }
  /** The body as UTF-8 text. */
  text() {
    return td.decode(this.body);
  }
  /** The body parsed as JSON; `undefined` when it is not JSON (errors are values here too). */
  json() {
    try {
      return JSON.parse(this.text());
    } catch {
      return undefined;
    }
  }
}

/** A transport-error response (status 0). */
export function transportError(code, message, requestId = null) {
  return new FedbusResponse(0, {}, new Uint8Array(0), code, message, requestId);
}

/** Turns a decoded Response frame into a FedbusResponse. */
export function responseFromFrame(f) {
  let status = 200;
  let statusSeen = false;
  let error = null;
  const headers = {};
  const add = (name, value) => {
    const k = name.toLowerCase();
    headers[k] = k in headers ? headers[k] + ", " + value : value;
  };
  for (const { tag, value } of f.meta) {
    if (tag === Tag.STATUS && !statusSeen) {
      statusSeen = true;
      const s = Number(td.decode(value));
      status = Number.isInteger(s) ? s : 502;
    } else if (tag === Tag.ERROR && error === null) {
      error = td.decode(value);
    } else if (tag === Tag.HEADER) {
      const line = td.decode(value);
      const i = line.indexOf(":");
      if (i > 0) add(line.slice(0, i).trim(), line.slice(i + 1).trim());
    } else if (tag === Tag.CONTENT_TYPE && !("content-type" in headers)) {
      headers["content-type"] = td.decode(value);
    } else if (tag === Tag.SERVED_BY && !("fedbus-served-by" in headers)) {
      headers["fedbus-served-by"] = td.decode(value);
    }
  }
  const ok = status >= 200 && status < 300;
  let message = null;
  if (!ok) {
    if (error === null) error = "http_" + status;
    const ct = headers["content-type"] || "";
    if (ct.startsWith("application/json")) {
      try {
        const j = JSON.parse(td.decode(f.payload));
        if (j && typeof j.message === "string") message = j.message;
        if (j && typeof j.error === "string" && error.startsWith("http_")) error = j.error;
      } catch {
        // not JSON: leave message null
      }
    }
  }
  return new FedbusResponse(status, headers, f.payload, error, message, f.requestId);
}

/**
 * Reconnect delay before attempt `attempt` (0 for the first retry): `initialMs * factor^attempt`
 * capped at `maxMs`, times a random factor in `[1 - jitter, 1 + jitter)`.
 * @param {number} attempt
 * @param {{initialMs?: number, maxMs?: number, factor?: number, jitter?: number}} [opts]
 * @param {() => number} [random] uniform in [0, 1)
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const { initialMs = 50, maxMs = 5000, factor = 2, jitter = 0.5 } = opts;
  const base = Math.min(maxMs, initialMs * Math.pow(factor, Math.max(0, attempt)));
  return Math.round(base * (1 - jitter + 2 * jitter * random()));
}

/**
 * The websocket URL for `url` and `token`: `http(s)://host[:port][/prefix]` becomes
 * `ws(s)://host[:port][/prefix]/api/ws`; a `ws(s)://` URL is taken as it is (its path
 * defaults to `/api/ws`). The token goes in `?access_token=` (browsers cannot set headers on a
 * websocket; PROTOCOL.md section 8).
 */
export function wsUrl(url, token) {
  const u = new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  else if (u.protocol !== "ws:" && u.protocol !== "wss:") throw new TypeError("url must be http(s) or ws(s): " + url);
  if (!u.pathname.endsWith("/api/ws")) u.pathname = u.pathname.replace(/\/$/, "") + "/api/ws";
  if (token) u.searchParams.set("access_token", token);
  return u.toString();
}

const DEFAULTS = {
  whileDisconnected: "wait",
  connectTimeoutMs: 10000,
  requestTimeoutMs: 30000,
  maxInFlight: 256,
  lateAnswerMs: 15000,
  stableMs: 1000,
  backoff: { initialMs: 50, maxMs: 5000, factor: 2, jitter: 0.5 },
};

/**
 * A client of `/api/ws`: one websocket, many requests in flight, reconnects with backoff.
 * Create it with `connect(url, token, options)`.
 */
export class FedbusClient {
  constructor(url, token, options = {}) {
    this.url = url;
    this._token = token;
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    wsUrl(url, "t"); // throws a TypeError now for a URL that can never work
    this._WS = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WS !== "function") throw new TypeError("no WebSocket: pass options.WebSocket");
    this._random = options.random || Math.random;
    /** @type {"connecting"|"open"|"waiting"|"idle"|"closed"} */
    this.state = "idle";
    /** Sockets opened so far (1 + reconnects that succeeded). */
    this.opens = 0;
    this._ws = null;
    this._attempt = 0;
    this._nextId = 1;
    this._inflight = new Map(); // id -> entry
    this._queue = []; // entries not sent yet
    this._timer = null;
    this._openedAt = 0;
    this._gotMessage = false;
    this._received = 0; // messages received, all sockets: a sent entry notes the count at its send
    this._readyWaiters = new Set();
    this._connect();
  }

  _setState(s, info) {
    if (this.state === s) return;
    this.state = s;
    if (this.options.onState) {
      try {
        this.options.onState(s, info || {});
      } catch {
        // a listener's error is not ours
      }
    }
    if (s === "open" || s === "closed") {
      for (const w of this._readyWaiters) w(s === "open");
      this._readyWaiters.clear();
    }
  }

  async _connect() {
    if (this.state === "closed" || this.state === "connecting" || this.state === "open") return;
    this._setState("connecting");
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (e) {
      token = null;
    }
    if (this.state !== "connecting") return; // closed meanwhile
    let ws;
    try {
      // `connect(url, null)` opens an anonymous session (the app's anonymous services only);
      // a token function that yields nothing is an error, not a silent anonymous session.
      if (!token && this._token !== null) throw new Error("no token");
      ws = new this._WS(wsUrl(this.url, token));
    } catch (e) {
      this._socketGone(null, 0, String((e && e.message) || e));
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._gotMessage = false;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._openedAt = Date.now();
      this.opens++;
      this._setState("open");
      this._flush();
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._gotMessage = true;
      this._received++;
      this._onMessage(ev.data);
    };
    ws.onerror = () => {
      // A close event always follows; the browser tells nothing more.
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._socketGone(ws, ev.code, ev.reason);
    };
  }

  _onMessage(data) {
    if (typeof data === "string") return; // the router sends none; ignore
    let f;
    try {
      f = decodeFrame(data);
    } catch (e) {
      this._drop(4000, "bad frame from the router: " + e.message);
      return;
    }
    if (f.kind !== Kind.Response) return;
    const entry = this._inflight.get(f.requestId);
    if (!entry) return; // not ours
    this._inflight.delete(f.requestId); // frees the slot, also of a request that timed out
    if (entry.lateTimer) clearTimeout(entry.lateTimer);
    entry.lateTimer = null;
    if (!entry.done) this._finish(entry, responseFromFrame(f)); // a late answer is ignored
    this._flush();
  }

  // A sent request timed out: it keeps its slot until the router's late answer (see
  // `_onMessage`) or, at the latest, until `lateAnswerMs` after it was sent, then `_release`.
  _holdLate(entry) {
    const left = entry.sentAt + this.options.lateAnswerMs - Date.now();
    if (left <= 0) {
      this._release(entry);
      return;
    }
    entry.lateTimer = setTimeout(() => {
      entry.lateTimer = null;
      this._release(entry);
    }, left);
  }

  // A timed-out request's answer is overdue (`lateAnswerMs` since it was sent). If every
  // request in flight has timed out too and nothing at all arrived on the socket since this one
  // was sent, the socket is taken for dead (a NAT that forgot it, a lost FIN: no close event
  // comes, and with nothing outstanding TCP never reports an error): it is dropped (4002) and
  // reopened with backoff. Otherwise the slot is freed and the queue moves on.
  _release(entry) {
    if (this._inflight.get(entry.id) !== entry) return; // answered, or its socket is gone
    let allTimedOut = true;
    for (const e of this._inflight.values()) {
      if (!e.done) {
        allTimedOut = false;
        break;
      }
    }
    if (allTimedOut && this._received === entry.receivedAtSend) {
      this._drop(4002, "no answers");
      return;
    }
    this._inflight.delete(entry.id);
    this._flush();
  }

  // Closes the current socket from our side and treats it as a drop.
  _drop(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
    this._socketGone(ws, code, reason);
  }

  _socketGone(ws, code, reason) {
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    this._ws = null;
    const wasOpen = this.state === "open";
    const detail = "socket closed" + (code ? " (" + code + (reason ? " " + reason : "") + ")" : "");
    this._clearInflight("disconnected", detail);
    if (this.state === "closed") return;
    // A session that stayed up (or answered something) starts the backoff over.
    if (wasOpen && (this._gotMessage || Date.now() - this._openedAt >= this.options.stableMs)) this._attempt = 0;
    if (code === 1001 && this._queue.length === 0) {
      // Closed for idleness: reconnect when the next request comes.
      this._setState("idle", { code, reason });
      return;
    }
    if (this.options.whileDisconnected === "fail") {
      const queued = this._queue;
      this._queue = [];
      for (const entry of queued) this._finish(entry, transportError("not_connected", detail));
    }
    // Requests that were only waiting for a free slot now wait for the reconnect, bounded.
    for (const entry of this._queue) this._armConnectTimer(entry);
    const delay = backoffDelay(this._attempt++, this.options.backoff, this._random);
    this._setState("waiting", { code, reason, delay });
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this.state === "waiting") this._connect();
    }, delay);
  }

  _armConnectTimer(entry) {
    if (entry.done || entry.connectTimer) return;
    const ms = this.options.connectTimeoutMs;
    entry.connectTimer = setTimeout(() => {
      this._finish(entry, transportError("not_connected", "no open socket within " + ms + " ms"));
    }, ms);
  }

  // Resolves every request in flight (those not resolved yet) to `code` and empties `_inflight`.
  _clearInflight(code, detail) {
    for (const entry of this._inflight.values()) {
      if (entry.lateTimer) clearTimeout(entry.lateTimer);
      entry.lateTimer = null;
      this._finish(entry, transportError(code, detail, entry.id));
    }
    this._inflight.clear();
  }

  _finish(entry, res) {
    if (entry.done) return;
    entry.done = true;
    if (entry.id === null) {
      const i = this._queue.indexOf(entry); // a request that was never sent leaves the queue
      if (i >= 0) this._queue.splice(i, 1);
    }
    if (entry.timer) clearTimeout(entry.timer);
    if (entry.connectTimer) clearTimeout(entry.connectTimer);
    entry.resolve(res);
  }

  _flush() {
    const ws = this._ws;
    while (this.state === "open" && ws && this._queue.length > 0 && this._inflight.size < this.options.maxInFlight) {
      const entry = this._queue.shift();
      if (entry.done) continue;
      if (entry.connectTimer) {
        clearTimeout(entry.connectTimer);
        entry.connectTimer = null;
      }
      entry.id = this._nextId++;
      if (this._nextId > Number.MAX_SAFE_INTEGER) this._nextId = 1;
      let bytes;
      try {
        bytes = encodeRequest(entry.id, entry.path, entry.body, entry.contentType, entry.method);
      } catch (e) {
        this._finish(entry, transportError("bad_request", e.message));
        continue;
      } finally {
        entry.body = null; // encoded (or refused): the entry no longer keeps the body alive
      }
      entry.sentAt = Date.now();
      entry.receivedAtSend = this._received;
      this._inflight.set(entry.id, entry);
      try {
        ws.send(bytes);
      } catch (e) {
        this._drop(4001, "send failed");
        return;
      }
    }
  }

  /**
   * Sends one request; resolves to its answer, never rejects.
   * @param {string} path `/api/<region>/<cluster>/<owner>/<app>/<service>/<wsid>/<module>/<function>`
   * @param {string|ArrayBuffer|ArrayBufferView|object|null} [body] a plain object or an array is
   *   sent as JSON; any other object (Blob, FormData, Map, ...) resolves to `bad_request`
   * @param {Record<string,string>} [headers] only `content-type` can be carried (PROTOCOL.md section 8)
   * @param {{timeoutMs?: number, method?: string}} [opts] `method`: GET, POST, PUT, PATCH or
   *   DELETE, as the task sees it (default POST)
   * @returns {Promise<FedbusResponse>}
   */
  request(path, body, headers, opts = {}) {
    return new Promise((resolve) => {
      const method = opts.method ?? "POST";
      const entry = {
        id: null,
        path,
        body: null,
        contentType: undefined,
        method,
        resolve,
        done: false,
        timer: null,
        connectTimer: null,
        lateTimer: null,
        sentAt: 0,
        receivedAtSend: 0,
      };
      const fail = (code, msg) => this._finish(entry, transportError(code, msg));
      if (this.state === "closed") return fail("closed", "client closed");
      if (typeof path !== "string" || !path.startsWith("/api/")) return fail("bad_request", "path must start with /api/");
      if (!METHODS.includes(method)) return fail("bad_request", "method must be one of " + METHODS.join(", "));
      for (const [k, v] of Object.entries(headers || {})) {
        if (k.toLowerCase() !== "content-type") {
          return fail("bad_request", "header " + k + " cannot be sent over /api/ws (only content-type)");
        }
        entry.contentType = String(v);
      }
      try {
        if (isJsonBody(body)) {
          entry.body = te.encode(JSON.stringify(body));
          if (entry.contentType === undefined) entry.contentType = "application/json";
        } else {
          entry.body = bodyBytes(body);
        }
      } catch (e) {
        return fail("bad_request", e.message);
      }
      const timeoutMs = opts.timeoutMs ?? this.options.requestTimeoutMs;
      if (timeoutMs > 0) {
        // A request already sent stays in `_inflight` (done, its answer to be ignored): the
        // router counts it against limits.max_inflight_per_connection until it answers (the
        // task's late answer or its own 504), so its slot is freed only then, when the socket
        // closes, or `lateAnswerMs` after the send (`_holdLate`); a request still queued just
        // leaves the queue.
        entry.timer = setTimeout(() => {
          entry.timer = null;
          const sent = entry.id !== null && this._inflight.get(entry.id) === entry;
          this._finish(entry, transportError("timeout", "no answer within " + timeoutMs + " ms", entry.id));
          if (sent) this._holdLate(entry);
        }, timeoutMs);
      }
      if (this.state !== "open") {
        if (this.options.whileDisconnected === "fail" && this.state !== "idle") {
          return fail("not_connected", "socket not open (" + this.state + ")");
        }
        this._armConnectTimer(entry);
      }
      this._queue.push(entry);
      if (this.state === "idle") this._connect();
      else this._flush();
    });
  }

  /**
   * Resolves to true once the socket is open, false if it is not within `timeoutMs` or the
   * client is closed.
   */
  ready(timeoutMs = this.options.connectTimeoutMs) {
    if (this.state === "open") return Promise.resolve(true);
    if (this.state === "closed") return Promise.resolve(false);
    if (this.state === "idle") this._connect();
    return new Promise((resolve) => {
      const w = (v) => {
        clearTimeout(t);
        this._readyWaiters.delete(w);
        resolve(v);
      };
      const t = setTimeout(() => w(false), timeoutMs);
      this._readyWaiters.add(w);
    });
  }

  /**
   * Requests sent on the current socket and not answered yet, the count `maxInFlight` bounds.
   * It includes requests that already resolved to `timeout` but whose answer (ignored when it
   * comes) the router still owes: they hold their slot until then, at most `lateAnswerMs` after
   * they were sent.
   */
  get inFlight() {
    return this._inflight.size;
  }

  /**
   * Closes the socket (code 1000) and stops reconnecting; requests in flight or waiting
   * resolve to transport error `closed`, later ones too.
   */
  close() {
    if (this.state === "closed") return;
    if (this._timer) clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._setState("closed");
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    this._ws = null;
    this._clearInflight("closed", "client closed");
    const queued = this._queue;
    this._queue = [];
    for (const entry of queued) this._finish(entry, transportError("closed", "client closed"));
  }
}

/**
 * Opens a client. `url` is the router's api listener (`http://127.0.0.1:8800`) or a full
 * `ws(s)://.../api/ws` URL; `token` a client JWT, or a function returning one (or a promise of
 * one), called before every (re)connect so an expired token can be replaced; or null for an
 * anonymous session, which reaches only the app's anonymous services.
 * @returns {FedbusClient}
 */
export function connect(url, token, options) {
  return new FedbusClient(url, token, options);
}
