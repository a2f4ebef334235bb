// The console's shell: sign-in, the views a principal may open, and the
// hash router (`#/functions/hello`) that renders one view at a time. Every
// view reads the platform through the public API only (api.js).

import { api, session } from './api.js';
import { button, clearError, field, h, showError } from './dom.js';
import * as account from './account.js';
import * as fleet from './fleet.js';
import * as functions from './functions.js';
import * as playground from './playground.js';
import * as tenants from './tenants.js';

// [route, title, view]: a view renders into its page and may return a
// function that stops what it started (refreshes, streams).
const TENANT_VIEWS = [
  ['functions', 'Functions', functions.list],
  ['playground', 'Playground', playground.view],
  ['models', 'Models', fleet.models],
  ['keys', 'Keys', account.keys],
  ['usage', 'Usage', account.usage],
];
const OPERATOR_VIEWS = [
  ['tenants', 'Tenants', tenants.list],
  ['models', 'Models', fleet.models],
  ['devices', 'Devices', fleet.devices],
  ['nodes', 'Nodes', fleet.nodes],
  ['usage', 'Usage', account.usage],
];
// Views of one thing in a list: `#/functions/NAME`, `#/tenants/NAME`.
const DETAILS = { functions: functions.detail, tenants: tenants.detail };

/** Who the token belongs to (`GET /v1/whoami`), once signed in. */
let who = null;
/** Stops the current view's refreshes and streams. */
let leave = null;
/** Counts renders, so that a slow one finishing late stops itself. */
let renders = 0;

async function route() {
  const render = ++renders;
  if (leave) leave();
  leave = null;
  clearError();
  const page = h('div');
  document.getElementById('view').replaceChildren(page);
  if (!who && session.token) {
    try {
      who = await api('GET', '/v1/whoami');
    } catch (error) {
      session.clear();
      showError(error);
    }
  }
  if (render !== renders) return;
  header();
  if (!who) {
    signin(page);
    return;
  }
  const views = who.role === 'admin' ? OPERATOR_VIEWS : TENANT_VIEWS;
  const [name, ...rest] = routeParts();
  const view = views.find(([id]) => id === name);
  if (!view) {
    location.replace(`#/${views[0][0]}`);
    return;
  }
  highlight(name);
  const show = rest.length > 0 && DETAILS[name] ? DETAILS[name] : view[2];
  try {
    const stop = await show(page, { who, params: rest });
    if (render === renders) leave = stop || null;
    else if (stop) stop();
  } catch (error) {
    // A render overtaken by another says nothing.
    if (render !== renders) return;
    if (error.status === 401) signout();
    showError(error);
  }
  if (render === renders) document.getElementById('view').focus({ preventScroll: true });
}

/** The hash's parts (`#/functions/hello` → functions, hello); none when it does not decode. */
function routeParts() {
  try {
    return location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  } catch {
    return [];
  }
}

function header() {
  const nav = document.getElementById('nav');
  const views = !who ? [] : who.role === 'admin' ? OPERATOR_VIEWS : TENANT_VIEWS;
  nav.replaceChildren(...views.map(([id, title]) => h('a', { href: `#/${id}`, 'data-view': id }, title)));
  document.getElementById('who').textContent = !who ? '' : who.role === 'admin' ? 'Operator' : `Tenant ${who.tenant}`;
  document.getElementById('signout').hidden = !who;
}

function highlight(name) {
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.view === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function signin(page) {
  const token = h('input', { type: 'password', name: 'token', autocomplete: 'off', required: true, spellcheck: 'false' });
  const form = h(
    'form',
    { class: 'signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in'),
    field(
      'API key or admin token',
      token,
      'Kept in this browser tab only: closing the tab or signing out forgets it.',
    ),
    h('button', { type: 'submit' }, 'Sign in'),
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    session.token = token.value.trim();
    try {
      who = await api('GET', '/v1/whoami');
    } catch (error) {
      session.clear();
      showError(error);
      return;
    }
    if (location.hash === '#/' || location.hash === '') route();
    else location.hash = '#/';
  });
  page.append(h('section', {}, form));
  token.focus();
}

function signout() {
  session.clear();
  who = null;
  if (leave) leave();
  leave = null;
  // One render: a hash change renders by itself.
  if (location.hash === '#/') route();
  else location.hash = '#/';
}

document.getElementById('signout').replaceWith(
  Object.assign(button('Sign out', async () => signout(), { quiet: true }), { id: 'signout', hidden: true }),
);
window.addEventListener('hashchange', route);
route();
