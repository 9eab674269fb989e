// A subscription's resource filter (G10): which resources of a project it
// asks the relay for. Checked here with the relay's own rule, so that a
// malformed filter is the app's TypeError at `subscribe`, not a
// `bad_request` that ends the subscription later.

/** Most resources one subscription may name (the relay's MAX_RESOURCES). */
export const MAX_RESOURCES = 32;

/** `relay.enable`'s rule for a resource name. */
const NAME = /^[A-Za-z_][A-Za-z0-9_.-]{0,63}$/;

/**
 * The filter `resources` asks for, duplicates dropped, in the order given;
 * `null` (every resource) when it is undefined or null.
 * @param {unknown} resources
 * @returns {string[]|null}
 */
export function normalize(resources) {
  if (resources === undefined || resources === null) return null;
  if (!Array.isArray(resources) || resources.length === 0 || resources.length > MAX_RESOURCES) {
    throw new TypeError(`subscribe: resources must be an array of 1 to ${MAX_RESOURCES} resource names`);
  }
  const names = [];
  for (const name of resources) {
    if (typeof name !== "string" || !NAME.test(name)) {
      throw new TypeError(
        `subscribe: ${JSON.stringify(name)} is not a resource name (a letter or _, then letters, digits, _ . -; at most 64)`,
      );
    }
    if (!names.includes(name)) names.push(name);
  }
  return names;
}

/**
 * Whether two filters ask for the same events (order does not matter).
 * @param {string[]|null} a
 * @param {string[]|null} b
 */
export function same(a, b) {
  if (a === null || b === null) return a === b;
  return a.length === b.length && a.every((name) => b.includes(name));
}

/**
 * Whether a subscription with `filter` gets `resource`'s events.
 * @param {string[]|null} filter
 * @param {string} resource
 */
export function wants(filter, resource) {
  return filter === null || filter.includes(resource);
}

/** How a filter reads in an error message. */
export function describe(filter) {
  return filter === null ? "every resource" : `resources [${filter.join(", ")}]`;
}
