// A minimal event emitter (no dependency on Node's or the DOM's).

export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /**
   * @param {string} event
   * @param {Function} fn
   * @returns {() => void} removes the listener
   */
  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  /** @param {string} event @param {Function} fn */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /**
   * Calls every listener; one that throws is reported on `listenerError`
   * (or the console) and never stops the others or the SDK.
   * @param {string} event
   * @param {...unknown} args
   */
  emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        if (event !== "listenerError" && this._listeners.get("listenerError")?.size) {
          this.emit("listenerError", err, event);
        } else {
          console.error(`pgrelay: a "${event}" listener threw`, err);
        }
      }
    }
  }
}
