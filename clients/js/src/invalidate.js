// Cache invalidation for apps that keep server state in a query cache
// (TanStack Query, SWR, Apollo...): each event of a mapped resource calls
// the app's callback, which invalidates the matching queries. It rides on
// the project's subscription, so it misses nothing across reconnects, and
// on `reset` it calls every callback, since anything may have changed.

/**
 * @param {import("./subscription.js").Subscription} subscription
 * @param {Record<string, (event: object|null) => void>} handlers  resource -> callback; "*" for any resource. On reset each is called with null.
 * @returns {() => void} stops
 */
export function invalidateOn(subscription, handlers) {
  const offEvent = subscription.on("event", (frame) => {
    handlers[frame.resource]?.(frame);
    handlers["*"]?.(frame);
  });
  const offReset = subscription.on("reset", () => {
    for (const fn of Object.values(handlers)) fn(null);
  });
  return () => {
    offEvent();
    offReset();
  };
}
