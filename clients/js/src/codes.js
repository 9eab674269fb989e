// Every code the relay speaks, named once, and what the SDK does about each.
// The relay's side is src/relay/protocol.rs (`close`, `code`, `reset_reason`);
// `cargo test --test client_js` checks that these tables hold exactly its
// codes (plus the close codes marked as the SDK's own below).

/** WebSocket close codes of the relay, and the three the SDK sees or sends itself. */
export const Close = Object.freeze({
  NORMAL: 1000, // not the relay's: the SDK's own close
  GOING_AWAY: 1001, // the relay is shutting down: reconnect and resume
  ABNORMAL: 1006, // not the relay's: the connection dropped without a close frame
  INVALID_PAYLOAD: 1007, // a frame was not valid UTF-8
  MESSAGE_TOO_BIG: 1009, // a frame exceeded the relay's inbound limit
  UNAUTHORIZED: 4001, // token missing, malformed or wrongly signed
  TOKEN_EXPIRED: 4002,
  UNRESPONSIVE: 4008, // no answer to pings
  RATE_LIMITED: 4029, // too many connections or frames: back off longer
  /** Not the relay's: sent by the SDK itself when the relay stops answering its pings. */
  CLIENT_PING_TIMEOUT: 4508,
});

/** Codes that the SDK never reconnects after: the same request would be refused again. */
const FATAL = new Set([Close.INVALID_PAYLOAD, Close.MESSAGE_TOO_BIG]);
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
  BINARY_NOT_SUPPORTED: "binary_not_supported",
  FORBIDDEN: "forbidden", // not a member, or membership revoked: the subscription ends
  AUTHORIZE_FAILED: "authorize_failed", // the app's rule failed for this project: the subscription ends
  NOT_SUBSCRIBED: "not_subscribed",
  TOO_MANY_SUBSCRIPTIONS: "too_many_subscriptions",
  UNAVAILABLE: "unavailable",
  RATE_LIMITED: "rate_limited",
  UNAUTHORIZED: "unauthorized",
  TOKEN_EXPIRED: "token_expired",
  TOO_LARGE: "too_large", // a broadcast payload or presence state over its limit
});

/**
 * Reasons of `reset` frames known today. Any other reason is a reset all
 * the same: the app reloads, the cursor moves to the frame's.
 */
export const ResetReason = Object.freeze({
  HISTORY_TRIMMED: "history_trimmed",
  SEQ_AHEAD: "seq_ahead",
  HISTORY_DIVERGED: "history_diverged",
});
