// Small DOM helpers shared by the web app's modules. Text goes in through
// textContent and properties only: nothing here parses HTML.

/** @param {string} id */
export const $ = (id) => document.getElementById(id);

/**
 * Build an element: `text` sets textContent, `dataset` merges, `on<event>`
 * adds a listener, dashed keys (aria-label) become attributes, the rest are
 * properties.
 * @param {string} tag
 * @param {object} [props]
 * @param {...(Node|string)} children
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else if (key.includes("-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

/** "12:03" style local time of an ISO timestamp. */
export function clock(iso, seconds = false) {
  const options = seconds ? { hour: "2-digit", minute: "2-digit", second: "2-digit" } : { hour: "2-digit", minute: "2-digit" };
  return new Date(iso).toLocaleTimeString([], options);
}
