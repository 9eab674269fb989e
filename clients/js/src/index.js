// pgrelay's client SDK. Every export in one place; the files behind it:
//   connection.js   Client: the socket, its states, reconnects, tokens, pings
//   subscription.js Subscription: one project's events, exactly once, in order;
//                   its broadcasts
//   presence.js     Presence: who is online in one project
//   cursor.js       what a subscription's cursor holds (the one place)
//   filter.js       a subscription's resource filter: its rule, its checks
//   collection.js   Collection: history + live events of one resource, no race
//   outbox.js       Outbox: writes that survive offline periods and reloads
//   api.js          ChatApi: the chat API under /v1
//   invalidate.js   invalidateOn: events -> an app's query-cache invalidation
//   codes.js, errors.js, backoff.js, tokens.js, emitter.js: the small parts

import { Collection } from "./collection.js";

export { Client } from "./connection.js";
export { Subscription } from "./subscription.js";
export { Presence } from "./presence.js";
export { Collection } from "./collection.js";
export { Outbox, unsent } from "./outbox.js";
export { ChatApi } from "./api.js";
export { invalidateOn } from "./invalidate.js";
export { Close, ErrorCode, ResetReason, closeAction } from "./codes.js";
export { PgRelayError, AuthError, ConnectionError, SubscriptionError, SignalError, ApiError, isRetryableStatus } from "./errors.js";
export { backoffDelay, DEFAULT_BACKOFF, SLOW_BACKOFF } from "./backoff.js";
export { TokenSource, expiresAt } from "./tokens.js";

/**
 * A keyed collection of `resource` in `project`: subscribes first, then
 * loads the history with `options.load` and merges it with live events.
 * It shares the project's subscription when there is one, whatever its
 * filter (one that leaves `resource` out is refused); otherwise it
 * subscribes to every resource.
 * @param {import("./connection.js").Client} client
 * @param {string} project
 * @param {string} resource
 * @param {import("./collection.js").CollectionOptions} options
 */
export function collection(client, project, resource, options) {
  const existing = client.subscriptions.get(String(project));
  const sub = existing && !existing.ended ? existing : client.subscribe(project);
  return new Collection(sub, resource, options);
}
