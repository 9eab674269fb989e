// The connection to the relay: one WebSocket, its state, and what brings it
// back. It reconnects with jittered backoff on network loss and on the
// close codes that say "come back", waits longer after 4029, asks the token
// provider again when a token is refused, and stops with a typed error on
// the codes that say "do not come back". It pings the relay (any frame
// answers) and drops a socket that stays silent. After every (re)connect it
// resubscribes each project from its cursor.

import { backoffDelay, DEFAULT_BACKOFF, SLOW_BACKOFF } from "./backoff.js";
import { Close, ErrorCode, closeAction } from "./codes.js";
import { Emitter } from "./emitter.js";
import { AuthError, ConnectionError, PgRelayError } from "./errors.js";
import * as Filter from "./filter.js";
import { Subscription } from "./subscription.js";
import { TokenSource, expiresAt } from "./tokens.js";

/** @typedef {"connecting" | "connected" | "disconnected" | "closed"} ConnectionState */

/** The `ref` of errors about broadcasts and presence. */
const SIGNAL_REFS = new Set(["broadcast", "presence", "presence_leave"]);

/** Token refusals in a row (with no healthy connection between) after which the SDK stops. */
const MAX_TOKEN_REFUSALS = 3;

/**
 * Events: `state` (ConnectionState), `error` (PgRelayError; `fatal` ones
 * come with the state `closed`), `reconnecting` ({delay, attempt, code}),
 * `authenticated` ({expiresAt}).
 */
export class Client extends Emitter {
  /**
   * @param {object} options
   * @param {string} [options.url]  the relay's WebSocket URL (`ws://host:port/ws`); in a browser, defaults to `/ws` on the page's origin
   * @param {import("./tokens.js").TokenProvider} options.token  a token, or a function (maybe async) returning one
   * @param {typeof WebSocket} [options.WebSocket]  an implementation, e.g. the `ws` package's (defaults to the global one)
   * @param {{min: number, max: number}} [options.backoff]  reconnect delays in ms (default 500 to 20,000)
   * @param {{min: number, max: number}} [options.slowBackoff]  after 4029 (default 5,000 to 60,000)
   * @param {number} [options.pingInterval]  ms between pings (default 20,000)
   * @param {number} [options.pingTimeout]  ms without any frame after a ping before the socket is dropped (default 10,000)
   * @param {number} [options.connectTimeout]  ms for a socket to open (default 10,000)
   * @param {number} [options.refreshBefore]  refresh the token this many ms before it expires (default 60,000; at most half its lifetime)
   * @param {boolean} [options.autoConnect]  connect at once (default true)
   */
  constructor(options) {
    super();
    const o = options ?? {};
    this.url = socketUrl(o.url);
    this.tokens = o.token instanceof TokenSource ? o.token : new TokenSource(o.token);
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new PgRelayError(
        "no WebSocket implementation: on Node 20 run with --experimental-websocket, or pass { WebSocket } from the `ws` package",
      );
    }
    this._backoff = { ...DEFAULT_BACKOFF, ...o.backoff };
    this._slowBackoff = { ...SLOW_BACKOFF, ...o.slowBackoff };
    this._pingInterval = o.pingInterval ?? 20_000;
    this._pingTimeout = o.pingTimeout ?? 10_000;
    this._connectTimeout = o.connectTimeout ?? 10_000;
    this._refreshBefore = o.refreshBefore ?? 60_000;
    /** @type {ConnectionState} */
    this.state = "disconnected";
    /** @type {Map<string, Subscription>} */
    this.subscriptions = new Map();
    /** @type {WebSocket|null} */
    this._ws = null;
    this._wsToken = null;
    this._healthy = false;
    this._opening = false;
    this._attempt = 0;
    this._tokenRefusals = 0;
    this._offline = false;
    this._timers = { reconnect: null, connect: null, ping: null, pong: null, refresh: null };
    /** Counters for the curious and for tests. */
    this.stats = { sockets: 0, reconnects: 0, lastClose: null };
    this._watchNetwork();
    if (o.autoConnect !== false) this.connect();
  }

  /** Connects (again) unless connected, connecting or closed for good. */
  connect() {
    if (this.state === "closed" || this._ws || this._opening || this._timers.reconnect) return;
    void this._open();
  }

  /** Closes for good: no reconnect, every subscription ends. */
  close() {
    if (this.state === "closed") return;
    this._dropSocket(Close.NORMAL);
    this._clearTimers();
    this._unwatchNetwork?.();
    for (const sub of [...this.subscriptions.values()]) sub._end(null);
    this.subscriptions.clear();
    this._setState("closed");
  }

  /**
   * The project's subscription, shared by every caller (one cursor per
   * project). `cursor`: a stored `subscription.cursor` to resume from;
   * `presence: true` watches its presence from the first subscribe (the
   * same as using `sub.presence`); `resources`: only these resources'
   * events (G10; omitted: every resource).
   *
   * The relay keeps one subscription per project per connection (a second
   * subscribe replaces the first), so a project has one filter here too:
   * asking for a project already subscribed with other resources (or with
   * a filter when it has none, or the reverse) throws a PgRelayError
   * (`filter_conflict`) rather than widen a view some caller narrowed or
   * narrow one another caller relies on. Unsubscribe it first, or open a
   * second Client.
   * @param {string|number} project
   * @param {{cursor?: unknown, presence?: boolean, resources?: string[]}} [options]
   */
  subscribe(project, options = {}) {
    if (this.state === "closed") throw new PgRelayError("the client is closed");
    const id = String(project);
    const resources = Filter.normalize(options.resources);
    const existing = this.subscriptions.get(id);
    if (existing && !existing.ended) {
      if (!Filter.same(existing.resources, resources)) {
        throw new PgRelayError(
          `project ${id} is already subscribed on this connection for ${Filter.describe(existing.resources)}, ` +
            `not ${Filter.describe(resources)}: a connection has one subscription per project (unsubscribe it first)`,
          { code: "filter_conflict" },
        );
      }
      if (options.presence) void existing.presence;
      return existing;
    }
    const sub = new Subscription(this, id, { ...options, resources });
    this.subscriptions.set(id, sub);
    this._send(sub._subscribeFrame());
    return sub;
  }

  // ---- socket ---------------------------------------------------------

  async _open() {
    this._timers.reconnect = null;
    if (this.state === "closed") return;
    if (this._offline) return this._setState("disconnected");
    this._setState("connecting");
    let token;
    this._opening = true;
    try {
      token = await this.tokens.get();
    } catch (err) {
      if (err instanceof AuthError) return this._fail(err);
      this.emit("error", new AuthError("the token provider failed; retrying", { code: "token_provider", cause: err }));
      return this._retry(this._backoff, null);
    } finally {
      this._opening = false;
    }
    if (this.state === "closed" || this._ws) return;
    if (this._offline) return this._setState("disconnected");
    const sep = this.url.includes("?") ? "&" : "?";
    const ws = new this._WebSocket(`${this.url}${sep}token=${encodeURIComponent(token)}`);
    this._ws = ws;
    this._wsToken = token;
    this._healthy = false;
    this.stats.sockets++;
    this._timers.connect = setTimeout(() => this._lost(ws, Close.ABNORMAL, "connect timeout"), this._connectTimeout);
    ws.onopen = () => {
      if (this._ws !== ws) return;
      clearTimeout(this._timers.connect);
      // `connected` waits for the relay's first frame: a refused token is
      // closed right after the socket opens.
      this._ping();
      for (const sub of this.subscriptions.values()) this._send(sub._subscribeFrame());
    };
    ws.onmessage = (ev) => this._onMessage(ws, ev.data);
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
    // Browsers follow an error with a close event; Node 20's WebSocket does
    // not when the connection fails, so the error ends the socket here.
    ws.onerror = () => this._lost(ws, Close.ABNORMAL, "socket error");
  }

  /** The socket `ws` is gone (closed by either side, or given up on). */
  _lost(ws, code, reason) {
    if (this._ws !== ws) return;
    this._dropSocket(Close.CLIENT_PING_TIMEOUT);
    this.stats.lastClose = { code, reason: String(reason ?? "") };
    if (this.state === "closed") return;
    if (this._offline) return this._setState("disconnected");
    switch (closeAction(code)) {
      case "fatal":
        return this._fail(
          new ConnectionError(`the relay closed the connection with ${code} (${reason || "no reason"}); not reconnecting`, {
            code,
            fatal: true,
          }),
        );
      case "token":
        return void this._tokenRefused(code, reason);
      case "slow":
        return this._retry(this._slowBackoff, code);
      default:
        return this._retry(this._backoff, code);
    }
  }

  /** Forgets the current socket (closing it if still open) and its timers. */
  _dropSocket(code) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    for (const t of ["connect", "ping", "pong", "refresh"]) {
      clearTimeout(this._timers[t]);
      this._timers[t] = null;
    }
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code);
    } catch {
      /* already closing */
    }
    for (const sub of this.subscriptions.values()) sub._onDisconnect();
  }

  _retry(bounds, code) {
    if (this.state === "closed") return;
    const delay = backoffDelay(this._attempt++, bounds);
    this.stats.reconnects++;
    this._setState("disconnected");
    this.emit("reconnecting", { delay, attempt: this._attempt, code });
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => void this._open(), delay);
  }

  async _tokenRefused(code, reason) {
    const refused = this._wsToken;
    if (++this._tokenRefusals >= MAX_TOKEN_REFUSALS) {
      return this._fail(new AuthError(`the relay refused ${this._tokenRefusals} tokens in a row (${code}: ${reason || "no reason"})`, { code, fatal: true }));
    }
    this._setState("disconnected");
    let fresh = null;
    try {
      fresh = await this.tokens.fresh("refused", refused);
    } catch (err) {
      return this._fail(new AuthError(`the relay refused the token (${code}) and the token provider failed`, { code, fatal: true, cause: err }));
    }
    if (this.state === "closed") return;
    if (fresh === refused) {
      return this._fail(
        new AuthError(`the relay refused the token (${code}: ${reason || "no reason"}) and the token provider has no other`, {
          code,
          fatal: true,
        }),
      );
    }
    this._retry({ min: 0, max: this._backoff.min }, code);
  }

  _fail(err) {
    this.emit("error", err);
    this.close();
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  // ---- frames -----------------------------------------------------------

  _onMessage(ws, data) {
    if (this._ws !== ws) return;
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      return this.emit("error", new PgRelayError("the relay sent a frame that is not JSON", { code: "bad_frame" }));
    }
    clearTimeout(this._timers.pong);
    this._timers.pong = null;
    if (!this._healthy && frame.type !== "error") {
      this._healthy = true;
      this._attempt = 0;
      this._tokenRefusals = 0;
      this._setState("connected");
      this._scheduleRefresh(expiresAt(this._wsToken ?? ""));
    }
    const sub = frame.project_id === undefined ? undefined : this.subscriptions.get(String(frame.project_id));
    switch (frame.type) {
      case "cache_invalidate":
        return sub?._onEvent(frame);
      case "subscribed":
        return sub?._onSubscribed(frame);
      case "reset":
        return sub?._onReset(frame);
      case "skipped":
        return sub?._onSkipped(frame);
      case "broadcast":
      case "broadcast_ack":
      case "presence_state":
      case "presence":
      case "presence_joined":
      case "presence_left":
        return sub?._onSignal(frame);
      case "error":
        return this._onErrorFrame(frame, sub);
      case "authenticated":
        this.emit("authenticated", { expiresAt: frame.expires_at * 1000 });
        return this._scheduleRefresh(frame.expires_at * 1000);
      default:
        return; // pong, unsubscribed, and frame types this SDK does not know yet
    }
  }

  _onErrorFrame(frame, sub) {
    // A refused subscribe names its project: that subscription ends (or
    // retries), the others go on.
    if (sub && frame.ref === "subscribe") return sub._onError(frame);
    // A refused broadcast or presence change: that subscription's error (or
    // its acknowledged broadcast's); one of a subscription already ended is
    // nobody's.
    if (SIGNAL_REFS.has(frame.ref) && frame.project_id !== undefined) return sub?._onSignalError(frame);
    // An answer to an unsubscribe concerns a subscription already forgotten
    // (the SDK forgets before it unsubscribes), not a newer one of the project.
    if (frame.ref === "unsubscribe" && frame.project_id !== undefined) return;
    if (frame.ref === "auth") {
      // A refreshed token was refused; the current one still holds until
      // it expires. Try again shortly; an expiry closes with 4002, which
      // asks the provider again.
      this.emit("error", new AuthError(`token refresh refused: ${frame.message}`, { code: frame.code }));
      this._timers.refresh = setTimeout(() => void this._refresh(), Math.max(1_000, this._backoff.max / 4));
      return;
    }
    if (frame.code === ErrorCode.RATE_LIMITED) {
      // A frame was dropped; resend every subscribe still unanswered.
      setTimeout(() => {
        for (const s of this.subscriptions.values()) if (s.state === "pending") this._send(s._subscribeFrame());
      }, 1_000);
    }
    this.emit("error", new PgRelayError(`relay error: ${frame.code}: ${frame.message}`, { code: frame.code }));
  }

  // ---- liveness and tokens -------------------------------------------------

  _ping() {
    clearTimeout(this._timers.ping);
    if (!this._send({ action: "ping" })) return;
    if (!this._timers.pong) {
      const ws = this._ws;
      this._timers.pong = setTimeout(() => this._lost(ws, Close.CLIENT_PING_TIMEOUT, "no answer to ping"), this._pingTimeout);
    }
    this._timers.ping = setTimeout(() => this._ping(), this._pingInterval);
  }

  _scheduleRefresh(expMs) {
    clearTimeout(this._timers.refresh);
    this._timers.refresh = null;
    if (!expMs) return;
    const left = expMs - Date.now();
    const lead = Math.min(this._refreshBefore, left / 2);
    this._timers.refresh = setTimeout(() => void this._refresh(), Math.max(1_000, left - lead));
  }

  async _refresh() {
    this._timers.refresh = null;
    const ws = this._ws;
    if (!ws) return;
    let token;
    try {
      token = await this.tokens.fresh("refresh", null);
    } catch (err) {
      this.emit("error", new AuthError("the token provider failed to refresh", { code: "token_provider", cause: err }));
      return;
    }
    if (this._ws !== ws || token === this._wsToken) return; // nothing newer: the relay will say 4002
    this._wsToken = token;
    this._send({ action: "auth", token });
  }

  // ---- subscriptions (called by Subscription) --------------------------------

  _resubscribe(sub) {
    if (this.subscriptions.get(sub.project) === sub) this._send(sub._subscribeFrame());
  }

  _resubscribeLater(sub) {
    setTimeout(() => this._resubscribe(sub), backoffDelay(1, this._backoff));
  }

  _unsubscribe(sub) {
    if (this._forget(sub)) this._send({ action: "unsubscribe", project_id: sub.project });
  }

  _forget(sub) {
    if (this.subscriptions.get(sub.project) !== sub) return false;
    this.subscriptions.delete(sub.project);
    return true;
  }

  // ---- state and network -----------------------------------------------------

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  _clearTimers() {
    for (const t of Object.keys(this._timers)) {
      clearTimeout(this._timers[t]);
      this._timers[t] = null;
    }
  }

  /** Browsers: drop the socket when the device goes offline, come back at once when it is online. */
  _watchNetwork() {
    const g = globalThis;
    if (typeof g.addEventListener !== "function" || typeof g.navigator?.onLine !== "boolean") return;
    this._offline = !g.navigator.onLine;
    const offline = () => {
      this._offline = true;
      clearTimeout(this._timers.reconnect);
      this._timers.reconnect = null;
      this._dropSocket(Close.NORMAL);
      if (this.state !== "closed") this._setState("disconnected");
    };
    const online = () => {
      this._offline = false;
      this._attempt = 0;
      this.connect();
    };
    g.addEventListener("offline", offline);
    g.addEventListener("online", online);
    this._unwatchNetwork = () => {
      g.removeEventListener("offline", offline);
      g.removeEventListener("online", online);
    };
  }
}

/** `ws://` or `wss://` URL of the relay's `/ws`. */
function socketUrl(url) {
  if (url) return String(url);
  const loc = globalThis.location;
  if (!loc) throw new PgRelayError("url is required outside a browser (e.g. ws://127.0.0.1:8080/ws)");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}
