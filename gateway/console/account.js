// A tenant's keys (create — shown once —, list, revoke) and usage over
// time; the operator's usage of every tenant.

import { answer, api, request, session } from './api.js';
import { bars } from './charts.js';
import { bytes, button, field, h, millis, number, showError, table, when } from './dom.js';

/** `#/keys`: the signed-in tenant's keys. */
export async function keys(page, { who }) {
  page.append(h('h1', {}, 'API keys'), await keySection(who.tenant));
}

/**
 * A tenant's keys, with create and revoke: for the tenant itself and for
 * the operator's view of a tenant.
 */
export async function keySection(tenant) {
  const path = `/v1/tenants/${encodeURIComponent(tenant)}/keys`;
  const created = h('div', { role: 'status' });
  const rows = h('div');
  // A key's id is its first characters: the session's own key is marked.
  const own = (id) => session.token && session.token.startsWith(id);
  const refresh = async () => {
    const { keys } = await api('GET', path);
    rows.replaceChildren(
      table(
        ['Key', 'Created', ''],
        keys.map((key) => [
          h('code', {}, `${key.id}…`),
          when(key.created_at),
          h('span', {}, own(key.id) ? h('em', { class: 'muted' }, 'this session ') : null,
            button('Revoke', async () => {
              const warning = own(key.id) ? ' This session signs in with it and will end.' : '';
              if (!confirm(`Revoke ${key.id}…? Requests with it will fail at once.${warning}`)) return;
              await api('DELETE', `${path}/${encodeURIComponent(key.id)}`);
              if (own(key.id)) {
                // This session's key is gone: so is the session.
                session.clear();
                location.reload();
                return;
              }
              created.replaceChildren(h('p', { class: 'ok' }, `Revoked ${key.id}…`));
              await refresh();
            }, { quiet: true, label: `Revoke ${key.id}` })),
        ]),
        { empty: 'No keys.', label: 'Keys' },
      ),
    );
  };
  const create = button('Create key', async () => {
    const key = await api('POST', path);
    created.replaceChildren(
      h('p', {}, 'The new key, shown only this once:'),
      h('pre', { class: 'light secret' }, h('code', { 'data-secret': 'key' }, key.key)),
    );
    await refresh();
  });
  await refresh();
  return h('section', {}, h('h2', {}, `Keys of ${tenant}`), create, created, rows);
}

const RANGES = [
  ['24', 'Last 24 hours'],
  ['168', 'Last 7 days'],
  ['720', 'Last 30 days'],
];

/** `#/usage`: per hour, from `GET /v1/usage` (a tenant's own, or any for the operator). */
export async function usage(page, { who }) {
  const range = h('select', { name: 'range' }, RANGES.map(([hours, text]) => h('option', { value: hours }, text)));
  const tenant = h('input', { name: 'tenant', placeholder: 'every tenant', spellcheck: 'false' });
  const body = h('div');
  const query = () => {
    const since = Math.floor(Date.now() / 1000) - (Number(range.value) - 1) * 3600;
    const params = new URLSearchParams({ since: String(since) });
    if (who.role === 'admin' && tenant.value.trim()) params.set('tenant', tenant.value.trim());
    return params;
  };
  // Only the latest of overlapping refreshes (a change and the timer) shows.
  let asked = 0;
  const refresh = async () => {
    const mine = ++asked;
    const hours = Number(range.value);
    const report = await api('GET', `/v1/usage?${query()}`);
    const sections = charts(report, hours);
    if (who.role !== 'admin') sections.push(outcomes((await api('GET', '/v1/functions')).functions));
    if (mine === asked) body.replaceChildren(...sections);
  };
  range.addEventListener('change', () => refresh().catch(showError));
  tenant.addEventListener('change', () => refresh().catch(showError));
  const csv = button('Export CSV', async () => {
    const params = query();
    params.set('format', 'csv');
    const response = await request('GET', `/v1/usage?${params}`);
    if (!response.ok) await answer(response);
    const link = h('a', { href: URL.createObjectURL(await response.blob()), download: 'usage.csv' });
    link.click();
    URL.revokeObjectURL(link.href);
  }, { quiet: true });
  page.append(
    h('h1', {}, 'Usage'),
    h('section', {}, h('div', { class: 'row' }, field('Period', range), who.role === 'admin' ? field('Tenant', tenant) : null), csv),
    body,
  );
  await refresh();
  const timer = setInterval(() => refresh().catch(showError), 10_000);
  return () => clearInterval(timer);
}

/** Charts per hour over `hours`, and totals per tenant. */
function charts(report, hours) {
  const start = Math.floor(Date.now() / 3_600_000) - hours + 1;
  const series = (pick) => {
    const values = new Array(hours).fill(0);
    for (const row of report.usage) {
      const at = Math.floor(Date.parse(row.hour) / 3_600_000) - start;
      if (at >= 0 && at < hours) values[at] += pick(row);
    }
    return values.map((value, index) => ({
      label: new Date((start + index) * 3_600_000).toLocaleString(undefined, hours > 24 ? { month: 'short', day: 'numeric' } : { hour: '2-digit', minute: '2-digit' }),
      value,
    }));
  };
  const totals = new Map();
  for (const row of report.usage) {
    const total = totals.get(row.tenant) || { requests: 0, compute: 0, model: 0, prompt: 0, generated: 0, in: 0, out: 0 };
    total.requests += row.requests;
    total.compute += row.compute_seconds;
    total.model += row.model_seconds;
    total.prompt += row.prompt_tokens;
    total.generated += row.generated_tokens;
    total.in += row.bytes_in;
    total.out += row.bytes_out;
    totals.set(row.tenant, total);
  }
  const seconds = (v) => `${number(v, 3)} s`;
  return [
    h(
      'section',
      {},
      h('h2', {}, 'Totals'),
      table(
        ['Tenant', 'Requests', 'Compute', 'Model compute', 'Prompt tokens', 'Generated tokens', 'Bytes in', 'Bytes out'],
        [...totals].map(([name, t]) => [name, number(t.requests), seconds(t.compute), seconds(t.model), number(t.prompt), number(t.generated), bytes(t.in), bytes(t.out)]),
        { empty: 'Nothing used in this period.', label: 'Usage totals' },
      ),
    ),
    h('section', { class: 'charts' },
      h('figure', {}, h('figcaption', {}, 'Requests per hour'), bars('Requests per hour', series((r) => r.requests), (v) => number(v))),
      h('figure', {}, h('figcaption', {}, 'Compute seconds per hour'), bars('Compute seconds per hour', series((r) => r.compute_seconds), (v) => number(v, 3))),
      h('figure', {}, h('figcaption', {}, 'Generated tokens per hour'), bars('Generated tokens per hour', series((r) => r.generated_tokens), (v) => number(v))),
    ),
  ];
}

/** A tenant's requests by outcome and latency per function, since the node started. */
function outcomes(functions) {
  const totals = new Map();
  for (const fn of functions) {
    for (const [outcome, count] of Object.entries(fn.requests.outcomes)) {
      totals.set(outcome, (totals.get(outcome) || 0) + count);
    }
  }
  return h(
    'section',
    {},
    h('h2', {}, 'Requests by outcome since this node started'),
    totals.size
      ? bars('Requests by outcome', [...totals].map(([label, value]) => ({ label, value })))
      : h('p', { class: 'muted' }, 'No requests yet.'),
    table(
      ['Function', 'Requests', 'Latency p50', 'Latency p99'],
      functions.map((fn) => {
        const latency = fn.requests.latency_seconds;
        return [fn.name, number(latency ? latency.count : 0), millis(latency && latency.p50), millis(latency && latency.p99)];
      }),
      { empty: 'No functions.', label: 'Latency by function' },
    ),
  );
}
