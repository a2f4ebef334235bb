// Building the page: elements from plain values (text is always text, never
// parsed as HTML, so names and log lines cannot inject markup), tables,
// and how numbers and times read.

/**
 * What the platform takes as a tenant or function name: lowercase letters,
 * digits and dashes, starting and ending with a letter or digit (an input's
 * `pattern`, matched with the `v` flag, where `-` is escaped).
 */
export const NAME_PATTERN = '[a-z0-9]([a-z0-9\\-]*[a-z0-9])?';

/** An element: `h('button', {type: 'button', onclick}, 'Save')`. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (name === 'class') element.className = value;
    else if (name === 'value') element.value = value;
    else element.setAttribute(name, value === true ? '' : String(value));
  }
  append(element, children);
  return element;
}

/** Appends text and elements, skipping null, undefined and false. */
export function append(element, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** A table with a header row; `rows` are arrays of cells. */
export function table(headers, rows, { empty = 'None yet.', label } = {}) {
  if (rows.length === 0) return h('p', { class: 'muted' }, empty);
  return h(
    'div',
    { class: 'scroll' },
    h(
      'table',
      { 'aria-label': label },
      h('thead', {}, h('tr', {}, headers.map((text) => h('th', { scope: 'col' }, text)))),
      h('tbody', {}, rows.map((cells) => h('tr', {}, cells.map((cell) => h('td', {}, cell))))),
    ),
  );
}

/** Fields made so far: each control gets an id of its own. */
let fields = 0;

/** A labelled form field; `control` is the input, select or textarea. */
export function field(label, control, hint) {
  fields += 1;
  const id = control.id || `field-${fields}`;
  control.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, label), control, hint && h('small', { class: 'muted' }, hint));
}

/** A Unix time (seconds or milliseconds) or RFC 3339 text, as local time. */
export function when(time) {
  if (time === null || time === undefined) return '—';
  const date = typeof time === 'number' ? new Date(time < 1e12 ? time * 1000 : time) : new Date(time);
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

/** Bytes in the largest unit that keeps a number ≥ 1. */
export function bytes(count) {
  if (count === null || count === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

/** A number with its thousands grouped; fractions to `digits` places. */
export function number(value, digits = 0) {
  if (value === null || value === undefined) return '—';
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

/** Seconds as milliseconds, or a dash when there is no value yet. */
export function millis(seconds) {
  return seconds === null || seconds === undefined ? '—' : `${number(seconds * 1000, 1)} ms`;
}

/** A button that runs `action` and shows its error, disabled meanwhile. */
export function button(text, action, { quiet = false, label } = {}) {
  const element = h('button', { type: 'button', class: quiet ? 'quiet' : null, 'aria-label': label }, text);
  element.addEventListener('click', async () => {
    element.disabled = true;
    clearError();
    try {
      await action();
    } catch (error) {
      showError(error);
    } finally {
      element.disabled = false;
    }
  });
  return element;
}

/** Shows an error at the bottom of the page until the next action. */
export function showError(error) {
  const box = document.getElementById('error');
  box.textContent = error && error.message ? error.message : String(error);
  box.hidden = false;
}

/** Hides the error shown last. */
export function clearError() {
  document.getElementById('error').hidden = true;
}
