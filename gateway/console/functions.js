// A tenant's functions: the list with deploy by drag and drop, and one
// function's versions (roll back), manifest, invoke playground and live log.

import { api, answer, readLines, readText, request } from './api.js';
import { bars } from './charts.js';
import { NAME_PATTERN, bytes, button, field, h, millis, number, showError, table, when } from './dom.js';

/** `#/functions`. */
export async function list(page) {
  const rows = h('div');
  const refresh = async () => {
    const { functions } = await api('GET', '/v1/functions');
    rows.replaceChildren(
      table(
        ['Function', 'Active version', 'Versions', 'Size', 'Last deployed', 'Requests', 'Failed', 'Latency p50 / p99', 'URL'],
        functions.map((f) => [
          h('a', { href: `#/functions/${encodeURIComponent(f.name)}` }, f.name),
          `v${f.active_version}`,
          f.versions.length,
          bytes(f.size),
          when(f.versions.at(-1).deployed_at),
          ...requestCells(f.requests),
          h('code', {}, f.url),
        ]),
        { empty: 'No functions yet: deploy one above.', label: 'Functions' },
      ),
    );
  };
  page.append(
    h('h1', {}, 'Functions'),
    h('section', {}, h('h2', {}, 'Deploy'), deployForm(refresh)),
    h('section', {}, h('h2', {}, 'Deployed'), rows),
  );
  await refresh();
}

/** Requests since the node started, those that failed, and latency. */
function requestCells(requests) {
  const outcomes = Object.entries((requests && requests.outcomes) || {});
  const total = outcomes.reduce((sum, [, n]) => sum + n, 0);
  const failed = outcomes.filter(([outcome]) => outcome !== 'ok').reduce((sum, [, n]) => sum + n, 0);
  const latency = requests && requests.latency_seconds;
  return [number(total), number(failed), latency ? `${millis(latency.p50)} / ${millis(latency.p99)}` : '—'];
}

/** A `.wasm` component or a bundle (`.tar`), dropped or chosen, deployed under a name. */
function deployForm(deployed) {
  const name = h('input', { name: 'name', required: true, pattern: NAME_PATTERN, maxlength: 63, spellcheck: 'false' });
  const file = h('input', { type: 'file', name: 'file', accept: '.wasm,.tar', class: 'file' });
  const chosen = h('span', { class: 'muted' }, 'Drop a .wasm component or a .tar bundle here, or choose one.');
  const status = h('p', { role: 'status', class: 'muted' });
  const choose = (picked) => {
    if (!picked) return;
    chosen.textContent = `${picked.name} (${bytes(picked.size)})`;
    if (!name.value) name.value = picked.name.replace(/\.(wasm|tar)$/, '').toLowerCase().replace(/[^a-z0-9-]+/g, '-');
  };
  file.addEventListener('change', () => choose(file.files[0]));
  const drop = h('label', { class: 'drop', for: 'deploy-file' }, chosen, file);
  file.id = 'deploy-file';
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    file.files = event.dataTransfer.files;
    choose(file.files[0]);
  });
  const deploy = button('Deploy', async () => {
    const picked = file.files[0];
    if (!picked) throw new Error('choose a .wasm component or a .tar bundle first');
    if (!name.reportValidity()) return;
    status.textContent = `Deploying ${picked.name} as ${name.value}…`;
    const type = picked.name.endsWith('.tar') ? 'application/x-tar' : 'application/wasm';
    try {
      const fn = await api('PUT', `/v1/functions/${encodeURIComponent(name.value)}`, { body: picked, type });
      status.textContent = `Deployed ${fn.name} version ${fn.active_version}.`;
    } catch (error) {
      status.textContent = '';
      throw error;
    }
    await deployed();
  });
  return h('div', { class: 'deploy' }, drop, h('div', { class: 'row' }, field('Name', name, 'Lowercase letters, digits and dashes.')), deploy, status);
}

/** `#/functions/NAME`. */
export async function detail(page, { params: [name] }) {
  const path = `/v1/functions/${encodeURIComponent(name)}`;
  const about = h('div');
  const versions = h('div');
  const requests = h('div');
  // Everything that changes with a rollback or a request, from the API.
  const show = (fn) => {
    about.replaceChildren(
      h('dl', { class: 'facts' }, h('dt', {}, 'Kind'), h('dd', { 'data-kind': '' }, fn.kind), h('dt', {}, 'URL'), h('dd', {}, h('code', {}, fn.url))),
      h('h2', {}, 'Manifest'),
      h('pre', { class: 'light' }, JSON.stringify(fn.manifest, null, 2)),
    );
    versions.replaceChildren(versionTable(fn, async (number) => {
      await api('PUT', `${path}/active`, { body: { version: number } });
      show(await api('GET', path));
    }));
    requests.replaceChildren(outcomes(fn.requests));
  };
  const fn = await api('GET', path);
  show(fn);
  // Stops the log and a response still streaming when the view is left.
  const left = new AbortController();
  const log = follow(name, left.signal);
  page.append(
    h('p', {}, h('a', { href: '#/functions' }, '← Functions')),
    h('h1', {}, name),
    h('section', {}, about),
    h('section', {}, h('h2', {}, 'Versions'), versions),
    h('section', {}, h('h2', {}, 'Requests since this node started'), requests),
    h('section', {}, h('h2', {}, 'Invoke'), invoker(fn, left.signal, async () => show(await api('GET', path)))),
    h('section', {}, h('h2', {}, 'Log (live)'), log),
    h(
      'section',
      {},
      button('Delete function', async () => {
        if (!confirm(`Delete ${name} and all its versions?`)) return;
        await api('DELETE', path);
        location.hash = '#/functions';
      }, { quiet: true }),
    ),
  );
  return () => left.abort();
}

/** The versions, newest first; `activate(number)` sends requests to another. */
function versionTable(fn, activate) {
  return table(
    ['Version', 'Deployed', 'Size', 'sha256', ''],
    fn.versions
      .slice()
      .reverse()
      .map((v) => [
        `v${v.number}`,
        when(v.deployed_at),
        bytes(v.size),
        h('code', { title: v.sha256 }, v.sha256.slice(0, 12)),
        v.number === fn.active_version
          ? h('strong', { class: 'ok' }, 'Active')
          : button(v.number < fn.active_version ? 'Roll back' : 'Roll forward', () => activate(v.number), {
              quiet: true,
              label: `Activate version ${v.number}`,
            }),
      ]),
    { label: 'Versions' },
  );
}

/** Requests by outcome as bars, with the latency percentiles. */
function outcomes(requests) {
  const counts = Object.entries((requests && requests.outcomes) || {});
  if (counts.length === 0) return h('p', { class: 'muted' }, 'No requests yet.');
  const [total, failed, latency] = requestCells(requests);
  return h(
    'div',
    {},
    h('p', {}, `${total} request${total === '1' ? '' : 's'}, ${failed} failed · latency p50 / p99 ${latency}`),
    bars('Requests by outcome', counts.map(([label, value]) => ({ label, value }))),
  );
}

/** The invoke playground: any method, path, headers and body; the answer streamed. */
function invoker(fn, signal, answered) {
  const method = h('select', { name: 'method' }, ['GET', 'POST', 'PUT', 'DELETE', 'PATCH'].map((m) => h('option', {}, m)));
  const path = h('input', { name: 'path', value: '/', spellcheck: 'false' });
  const headers = h('textarea', { name: 'headers', rows: 2, spellcheck: 'false', placeholder: 'content-type: application/json' });
  const body = h('textarea', { name: 'body', rows: 4, spellcheck: 'false' });
  const status = h('p', { role: 'status', class: 'muted' });
  const output = h('pre', { 'aria-label': 'Response body', 'aria-live': 'polite' });
  const send = button('Send', async () => {
    const extra = {};
    for (const line of headers.value.split('\n')) {
      const at = line.indexOf(':');
      if (at > 0) extra[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    const suffix = path.value.startsWith('/') ? path.value : `/${path.value}`;
    const withBody = !['GET', 'HEAD'].includes(method.value);
    output.textContent = '';
    status.textContent = 'Sending…';
    const started = performance.now();
    const response = await request(method.value, fn.url + suffix, {
      headers: extra,
      body: withBody ? body.value : undefined,
      signal,
    });
    status.textContent = `${response.status} ${response.statusText} · ${response.headers.get('content-type') || 'no content type'}`;
    await readText(response, (text) => output.append(text));
    status.textContent += ` · ${Math.round(performance.now() - started)} ms`;
    await answered();
  });
  return h(
    'div',
    { class: 'invoke' },
    h('div', { class: 'row' }, field('Method', method), field('Path', path, `Below ${fn.url}`)),
    field('Headers', headers, 'One per line: name: value'),
    field('Body', body),
    send,
    status,
    output,
  );
}

/** The function's log: recent lines, then each new one as it is written, until `signal`. */
function follow(name, signal) {
  const element = h('pre', { class: 'log', 'aria-label': 'Function log', 'aria-live': 'polite' });
  (async () => {
    const response = await request('GET', `/v1/functions/${encodeURIComponent(name)}/logs?follow=true`, { signal });
    if (!response.ok) await answer(response);
    await readLines(response, (text) => {
      if (!text) return;
      const line = JSON.parse(text);
      const time = line.time_ms ? new Date(line.time_ms).toLocaleTimeString() : '';
      element.append(h('span', { class: line.stream }, `${time} ${line.stream} ${line.line}\n`));
      element.scrollTop = element.scrollHeight;
    });
    element.append(h('span', { class: 'platform' }, '— the log stream ended —\n'));
  })().catch((error) => {
    if (!signal.aborted) showError(error);
  });
  return element;
}
