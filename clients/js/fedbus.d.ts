// Types of fedbus.js, the client of the fedbus client websocket endpoint `GET /api/ws`.

/** Frame kinds (docs/PROTOCOL.md section 5). */
export declare const Kind: Readonly<{ Request: 1; Response: 2; Redirect: 3; SecretPush: 4 }>;

/** Metadata tags (docs/PROTOCOL.md section 5). */
export declare const Tag: Readonly<{
  APP: 1;
  ROLE: 2;
  SERVICE: 3;
  MODULE: 4;
  FUNCTION: 5;
  WSID: 6;
  METHOD: 7;
  CLUSTER: 8;
  CONTENT_TYPE: 9;
  SUBJECT: 10;
  STATUS: 16;
  HEADER: 17;
  PARTITION: 18;
  VERSION: 19;
  ERROR: 20;
  SERVED_BY: 21;
  HOPS: 22;
  EMERGENCY_FOR: 23;
  PATH: 24;
  TOKEN: 25;
}>;

export declare const MAGIC: 0xfb;
export declare const HEADER_LEN: 24;
export declare const MAX_META_VALUE: 65535;

/**
 * Codes of transport errors (a response with status 0). `timeout`: no answer within the
 * request's timeout (a late answer is ignored; see `ClientOptions.lateAnswerMs`). `bad_request`: the client refused to send the
 * request: a path that does not start with `/api/`, a method other than GET/POST/PUT/PATCH/DELETE,
 * a header other than `content-type`, a body of another type, a metadata value over 65535 bytes.
 */
export type TransportError = "disconnected" | "not_connected" | "timeout" | "closed" | "bad_request";
export declare const TRANSPORT_ERRORS: readonly TransportError[];

/**
 * A request body: text (sent as UTF-8), bytes, or nothing. `request` also takes a `JsonBody`.
 */
export type Body = string | ArrayBuffer | ArrayBufferView | null | undefined;

/**
 * A body `request` sends as JSON (content-type application/json): a plain object (prototype
 * `Object.prototype` or null) or an array. Any other object (Blob, File, FormData,
 * URLSearchParams, Map, Date, a class instance, ...) resolves to `bad_request` at run time, and
 * this type refuses it at compile time (a class or interface type has no index signature). A
 * value typed by an interface of yours is refused too: spread it (`{ ...value }`) or declare
 * its type with `type` instead of `interface`.
 */
export type JsonBody = Record<string, unknown> | unknown[];

/** Only `content-type` can travel on `/api/ws`; any other name resolves to `bad_request`. */
export type RequestHeaders = { "content-type"?: string; "Content-Type"?: string } & Record<string, string>;

/** One metadata entry of a frame. */
export interface MetaEntry {
  tag: number;
  value: Uint8Array;
}

/** A decoded fedbus frame. */
export interface Frame {
  kind: number;
  flags: number;
  hops: number;
  partition: number;
  requestId: number;
  meta: MetaEntry[];
  payload: Uint8Array;
}

/** An answer, or a transport error (status 0). Never thrown: always the value of a promise. */
export declare class FedbusResponse {
  /** HTTP status of the answer; 0 for a transport error. */
  readonly status: number;
  /** Headers, names lower-case (the task's HEADER lines, content-type and the router's fedbus-*). */
  readonly headers: Record<string, string>;
  readonly body: Uint8Array;
  /**
   * null for a 2xx answer; otherwise the router's error code (`no_live_task`, `wrong_app`, ...),
   * `http_<status>` for a task's own non-2xx answer, or a TransportError when status is 0.
   */
  readonly error: string | null;
  /** The router's JSON `message`, or a transport error's detail; null otherwise. */
  readonly message: string | null;
  /** The request id used on the socket; null when the request was never sent. */
  readonly requestId: number | null;
  /** status in 200..299. */
  readonly ok: boolean;
  /** status === 0. */
  readonly transport: boolean;
  /** The body as UTF-8 text. */
  text(): string;
  /** The body parsed as JSON, or undefined when it is not JSON. */
  json<T = unknown>(): T | undefined;
}

export type ClientState = "connecting" | "open" | "waiting" | "idle" | "closed";

export interface BackoffOptions {
  /** First retry delay, ms (default 50). */
  initialMs?: number;
  /** Cap of the delay before jitter, ms (default 5000). */
  maxMs?: number;
  /** Growth per failed attempt (default 2). */
  factor?: number;
  /** Each delay is multiplied by a random factor in [1 - jitter, 1 + jitter) (default 0.5). */
  jitter?: number;
}

export interface ClientOptions {
  /**
   * What a request does while the socket is not open: `"wait"` (default) queues it until the
   * socket opens, for at most `connectTimeoutMs` (then `not_connected`); `"fail"` resolves it
   * at once to `not_connected` (an `idle` client still connects first).
   */
  whileDisconnected?: "wait" | "fail";
  /** Longest wait of a queued request for an open socket, ms (default 10000). */
  connectTimeoutMs?: number;
  /** Default per-request timeout, ms, from the call to the answer; 0 for none (default 30000). */
  requestTimeoutMs?: number;
  /**
   * Requests on the wire at once; the rest queue (default 256, the router's default limit).
   * A timed-out request holds its slot until the router answers it, at most `lateAnswerMs`
   * after it was sent (see `inFlight`).
   */
  maxInFlight?: number;
  /**
   * How long after sending a request the router's answer is due, ms (default 15000: the
   * router's default `request_timeout_ms`, 10 s, plus a margin for forwarding; raise it with
   * the router's). A request that resolved to `timeout` keeps its `maxInFlight` slot until its
   * late answer comes or until this long after it was sent, whichever is first, so slots
   * always come free. When that bound passes, every request in flight has timed out and
   * nothing at all arrived on the socket since that request was sent, the socket is taken for
   * dead (it died silently: no close event, and the router sends no pings by default): the
   * client closes it (4002 "no answers"), in-flight requests, all already resolved, are
   * forgotten, and it connects again with backoff; queued requests go on the new socket. A
   * request without a timeout (`timeoutMs: 0`) or still within it keeps the socket open.
   */
  lateAnswerMs?: number;
  /** A socket that stayed open this long (or answered anything) resets the backoff (default 1000). */
  stableMs?: number;
  backoff?: BackoffOptions;
  /** Called on every state change; `info` has `code`/`reason` of a close and `delay` of a wait. */
  onState?: (state: ClientState, info: { code?: number; reason?: string; delay?: number }) => void;
  /** The WebSocket class to use (default globalThis.WebSocket). */
  WebSocket?: new (url: string) => WebSocket;
  /** Source of randomness for the jitter, uniform in [0, 1) (default Math.random). */
  random?: () => number;
}

/** A client JWT, a function returning one, or null for an anonymous session (the app's anonymous services only). */
export type TokenSource = string | null | (() => string | Promise<string>);

export declare class FedbusClient {
  constructor(url: string, token: TokenSource, options?: ClientOptions);
  readonly url: string;
  readonly options: Required<Omit<ClientOptions, "onState" | "WebSocket" | "random">> & ClientOptions;
  /** Current state. */
  readonly state: ClientState;
  /** Sockets that opened so far. */
  readonly opens: number;
  /**
   * Requests sent on the current socket and not answered yet: the count `maxInFlight` bounds.
   * A request that resolved to `timeout` stays counted until its (ignored) late answer or the
   * router's 504 arrives, since the router counts it until then, or the socket closes, or
   * `lateAnswerMs` after it was sent.
   */
  readonly inFlight: number;
  /**
   * Sends a request; resolves to its answer and never rejects. `path` is
   * `/api/<region>/<cluster>/<owner>/<app>/<service>/<wsid>/<module>/<function>`; the task sees
   * METHOD `POST` unless `opts.method` says otherwise. A plain object or array body is sent as
   * JSON (content-type application/json). Resolves to transport error `bad_request`, unsent, for
   * a path that does not start with `/api/` (checked by the client, not the router), a method
   * other than GET/POST/PUT/PATCH/DELETE, a header other than content-type, or a body of another
   * type (a number, Blob, FormData, Map, ...). On `timeout` the request keeps its `maxInFlight`
   * slot until the router answers it, at most `lateAnswerMs` after it was sent (see `inFlight`).
   */
  request(path: string, body?: Body | JsonBody, headers?: RequestHeaders, opts?: { timeoutMs?: number; method?: "GET" | "POST" | "PUT" | "PATCH" | "DELETE" }): Promise<FedbusResponse>;
  /** true once the socket is open; false after timeoutMs (default connectTimeoutMs) or close(). */
  ready(timeoutMs?: number): Promise<boolean>;
  /** Closes the socket (1000) and stops reconnecting; pending requests resolve to `closed`. */
  close(): void;
}

/** Opens a client of `url` (`http://host:port` or `ws://host:port/api/ws`). */
export declare function connect(url: string, token: TokenSource, options?: ClientOptions): FedbusClient;

/** Request frame bytes: kind 1, `id`, PATH and optional CONTENT_TYPE, the body. */
export declare function encodeRequest(id: number, path: string, body: Uint8Array, contentType?: string, method?: string): Uint8Array;
/** Decodes one frame; throws an Error on a malformed one. */
export declare function decodeFrame(data: ArrayBuffer | Uint8Array): Frame;
/** A Response frame as a FedbusResponse. */
export declare function responseFromFrame(frame: Frame): FedbusResponse;
/** A transport error value (status 0). */
export declare function transportError(code: TransportError, message: string, requestId?: number | null): FedbusResponse;
/** Delay before retry number `attempt` (0-based). */
export declare function backoffDelay(attempt: number, opts?: BackoffOptions, random?: () => number): number;
/** The websocket URL of `url` with `?access_token=`. */
export declare function wsUrl(url: string, token?: string): string;
/** Bytes of a body; throws a TypeError for another type. */
export declare function bodyBytes(body: Body): Uint8Array;
