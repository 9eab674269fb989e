// The cursor of a subscription: where the app is in a project's stream of
// events, so that a resubscribe after any reconnect resumes exactly there.
//
// This file is the only place that knows what a cursor holds. Everything
// else treats a cursor as an opaque, JSON-serialisable value and goes
// through these functions: what is kept after an event, after `subscribed`
// and after `reset`; what a `subscribe` frame carries to resume; how an
// event frame is placed relative to the cursor; and how a stored cursor is
// read back.
//
// A cursor names an event, not only a number: the seq of the last event
// handed to the app and that event's `timestamp` (its capture time, which
// the relay's `subscribed` and `reset` frames carry too). The relay checks
// on resume that its log still holds that very event, and answers `reset`
// (`history_diverged`) when it does not: a failover that lost commits this
// app already saw makes seqs repeat with other events, which a bare seq
// cannot tell (docs/protocol.md, "Resume").

/**
 * @typedef {{seq: number, timestamp?: string}} Cursor
 * @typedef {{seq: number, timestamp?: string|null}} PositionedFrame  an event, `subscribed` or `reset` frame
 */

/** The cursor at `frame`'s position, with its event's name when it has one. */
function at(frame) {
  return typeof frame.timestamp === "string"
    ? { seq: frame.seq, timestamp: frame.timestamp }
    : { seq: frame.seq };
}

/** The cursor once `frame`, an event, has been handed to the app. */
export function afterEvent(frame) {
  return at(frame);
}

/**
 * The cursor a subscription without one takes from `subscribed`: live from
 * here on (the frame carries the latest event at subscribe time).
 */
export function fromSubscribed(frame) {
  return at(frame);
}

/**
 * The cursor after `reset`, whatever its reason: the relay goes on with the
 * events after the frame's position, which may be lower than the old cursor
 * (a database restored, a history that diverged).
 */
export function fromReset(frame) {
  return at(frame);
}

/**
 * The fields a `subscribe` frame carries to resume after `cursor`; none for
 * a subscription that has no cursor yet (live from now).
 * @param {Cursor|null} cursor
 */
export function subscribeFields(cursor) {
  if (!cursor) return {};
  return cursor.timestamp === undefined
    ? { since_seq: cursor.seq }
    : { since_seq: cursor.seq, since_timestamp: cursor.timestamp };
}

/**
 * Where an event frame stands relative to the cursor: the one expected
 * next, one already handed to the app, or one ahead of a gap.
 * @param {Cursor} cursor
 * @param {PositionedFrame} frame
 * @returns {"next" | "duplicate" | "ahead"}
 */
export function place(cursor, frame) {
  if (frame.seq === cursor.seq + 1) return "next";
  return frame.seq <= cursor.seq ? "duplicate" : "ahead";
}

/**
 * A key that orders frames held back ahead of a gap.
 * @param {PositionedFrame} frame
 */
export function orderKey(frame) {
  return frame.seq;
}

/**
 * A stored cursor (from `subscription.cursor`, maybe through JSON) back
 * into a cursor; `null` when `value` is not one.
 * @param {unknown} value
 * @returns {Cursor|null}
 */
export function parse(value) {
  if (value && typeof value === "object" && Number.isSafeInteger(value.seq) && value.seq >= 0) {
    return at(value);
  }
  return null;
}
