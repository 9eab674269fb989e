// Every code the relay speaks, named once, and what the SDK does about each.
// The relay's side is src/relay/protocol.rs (`close`, `code`, `reset_reason`).

/** WebSocket close codes of the relay. */
export const Close = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // the relay is shutting down: reconnect and resume
  ABNORMAL: 1006, // the connection dropped without a close frame
  INVALID_PAYLOAD: 1007, // a frame was not valid UTF-8
  MESSAGE_TOO_BIG: 1009, // a frame exceeded the relay's inbound limit
  UNAUTHORIZED: 4001, // token missing, malformed or wrongly signed
  TOKEN_EXPIRED: 4002,
  FORBIDDEN: 4003, // the connection itself is refused (origin, limits)
  UNRESPONSIVE: 4008, // no answer to pings
  RATE_LIMITED: 4029, // too many connections or frames: back off longer
  /** Sent by the SDK itself when the relay stops answering its pings. */
  CLIENT_PING_TIMEOUT: 4508,
});

/** Codes that the SDK never reconnects after: the same request would be refused again. */
const FATAL = new Set([Close.INVALID_PAYLOAD, Close.MESSAGE_TOO_BIG, Close.FORBIDDEN]);
/** Codes that say the token was refused: ask the token provider for a new one. */
const TOKEN_REFUSED = new Set([Close.UNAUTHORIZED, Close.TOKEN_EXPIRED]);

/**
 * What to do after the socket closed with `code`.
 * @param {number} code
 * @returns {"reconnect" | "slow" | "token" | "fatal"}
 */
export function closeAction(code) {
  if (TOKEN_REFUSED.has(code)) return "token";
  if (FATAL.has(code)) return "fatal";
  if (code === Close.RATE_LIMITED) return "slow";
  return "reconnect"; // 1000, 1001, 1006, 4008, anything unknown
}

/** Codes of `error` frames. */
export const ErrorCode = Object.freeze({
  BAD_JSON: "bad_json",
  BAD_REQUEST: "bad_request",
  UNKNOWN_ACTION: "unknown_action",
  FORBIDDEN: "forbidden",
  NOT_SUBSCRIBED: "not_subscribed",
  TOO_MANY_SUBSCRIPTIONS: "too_many_subscriptions",
  UNAVAILABLE: "unavailable",
  RATE_LIMITED: "rate_limited",
  UNAUTHORIZED: "unauthorized",
  TOKEN_EXPIRED: "token_expired",
});

/**
 * Reasons of `reset` frames known today. Any other reason is a reset all
 * the same: the app reloads, the cursor moves to the frame's.
 */
export const ResetReason = Object.freeze({
  HISTORY_TRIMMED: "history_trimmed",
  SEQ_AHEAD: "seq_ahead",
});
