// Full-jitter exponential backoff: the n-th retry waits a random time
// between `min` and min(max, min * 2^n), so a crowd of clients that lost
// the relay at once does not come back at once.

/**
 * @typedef {{min: number, max: number}} BackoffBounds  milliseconds
 */

/**
 * @param {number} attempt  0 for the first retry
 * @param {BackoffBounds} bounds
 * @param {() => number} [random]
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, bounds, random = Math.random) {
  const min = Math.max(0, bounds.min);
  const max = Math.max(min, bounds.max);
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.round(min + random() * (cap - min));
}

/** The bounds the SDK uses unless told otherwise. */
export const DEFAULT_BACKOFF = Object.freeze({ min: 500, max: 20_000 });
/** After a 4029 (too many connections or frames): longer. */
export const SLOW_BACKOFF = Object.freeze({ min: 5_000, max: 60_000 });
