// The model fleet as it runs: models (state, device, memory, queue depth,
// batching, calls) refreshed live, devices with the memory of each model,
// and the nodes of a cluster with their models and load.

import { api } from './api.js';
import { histogram, sparkline } from './charts.js';
import { bytes, clearError, h, millis, number, showError, table, when } from './dom.js';

/** Samples of queue depth kept per model (one a second). */
const HISTORY = 60;

/** `#/models`: what the signed-in principal may see, every second. */
export async function models(page, { who }) {
  const body = h('div');
  const depths = new Map();
  const refresh = async () => {
    const { models } = await api('GET', '/v1/models');
    for (const m of models) {
      const series = depths.get(key(m)) || [];
      series.push(queued(m));
      if (series.length > HISTORY) series.shift();
      depths.set(key(m), series);
    }
    body.replaceChildren(
      ...(models.length ? models.map((m) => card(m, depths.get(key(m)), who.role === 'admin')) : [h('p', { class: 'muted' }, 'No models.')]),
    );
  };
  page.append(h('h1', {}, 'Models'), h('p', { class: 'muted' }, 'Refreshed every second.'), body);
  await refresh();
  return every(1000, refresh);
}

/** A model's key: its name, `tenant/name` when private (two tenants may both have a `mine`). */
function key(m) {
  return m.owner ? `${m.owner}/${m.name}` : m.name;
}

/** One model: what it is, where it runs, and what it is doing. */
function card(m, depths, operator) {
  const stat = (label, value) => h('div', { class: 'stat' }, h('span', {}, label), h('strong', {}, value));
  const text = m.generation;
  const depth = stat('Queued', h('span', {}, h('span', { 'data-queued': key(m) }, number(queued(m))), ' ', sparkline(depths, `${key(m)} queue depth, last minute`)));
  // A text model shows its counters while it is loaded.
  const unloadedText = !text && m.task === 'text-generation';
  const stats = unloadedText ? [depth, stat('Generations', 'not loaded')] : [
    depth,
    text ? stat('Generating', `${number(text.active)} of ${number(text.config.max_sequences)}`) : null,
    stat(text ? 'Generations' : 'Calls', number(text ? text.started : m.stats.calls)),
    text ? stat('Tokens', `${number(text.prompt_tokens)} in · ${number(text.completion_tokens)} out`) : null,
    text ? stat('Decode steps', number(text.steps)) : stat('Batches', number(m.stats.batches)),
    text ? null : stat('Rows per batch', h('span', {}, number(m.stats.mean_batch_rows, 2), ' ', histogram(m.stats.batch_rows, `${m.name} rows per batch`))),
    text ? null : stat('Queue wait p50 / p99', `${millis(m.stats.queue_wait_seconds.p50)} / ${millis(m.stats.queue_wait_seconds.p99)}`),
    stat('Refused', number(text ? text.rejected : m.stats.rejected)),
  ];
  if (operator) stats.push(stat('By tenant', h('span', { 'data-tenants': key(m), class: 'lines' }, byTenant(m.tenants || {}))));
  return h(
    'section',
    { class: 'model', 'aria-label': m.name },
    h('h2', {}, m.name, ' ', h('span', { class: `state ${m.state}`, title: m.error || '' }, m.state)),
    h(
      'p',
      { class: 'muted' },
      [m.task, m.engine, m.device || 'no device', bytes(m.memory_bytes), m.owner ? `private to ${m.owner}` : m.public ? 'public' : 'by quota']
        .filter(Boolean)
        .join(' · '),
    ),
    m.error ? h('p', { class: 'bad' }, m.error) : null,
    h('div', { class: 'stats' }, stats),
  );
}

/** Each tenant's calls (tensor models) or tokens (text models). */
function byTenant(tenants) {
  const lines = Object.entries(tenants).map(([tenant, used]) =>
    used.calls !== undefined
      ? `${tenant}: ${number(used.calls)} calls, ${number(used.compute_seconds, 2)} s`
      : `${tenant}: ${number(used.prompt_tokens)} + ${number(used.generated_tokens)} tokens`,
  );
  return lines.length ? lines.join('\n') : '—';
}

/** Calls or generations waiting for the model right now. */
function queued(model) {
  return (model.generation ? model.generation.queued : 0) + (model.stats ? model.stats.queued : 0);
}

/** `#/devices`: memory per device and the models placed on it. */
export async function devices(page) {
  const body = h('div');
  const refresh = async () => {
    const [found, { models }] = await Promise.all([api('GET', '/v1/devices'), api('GET', '/v1/models')]);
    const gpus = found.cuda_unavailable
      ? h('p', { class: 'muted' }, `No GPU in use: ${found.cuda_unavailable}`)
      : null;
    body.replaceChildren(
      ...[gpus].filter(Boolean),
      ...found.devices.map((device) => {
        const placed = models.filter((m) => m.device === device.id);
        const share = device.budget_bytes > 0 ? Math.min(1, device.used_bytes / device.budget_bytes) : 0;
        return h(
          'section',
          {},
          h('h2', {}, `${device.id} · ${device.name}`),
          h('p', {}, `${bytes(device.used_bytes)} of ${bytes(device.budget_bytes)} for models used · ${bytes(device.memory_total_bytes)} in all, ${bytes(device.memory_free_bytes)} free at start`),
          h('meter', { min: 0, max: 1, value: share, 'aria-label': `${device.id} model memory used` }),
          table(['Model', 'State', 'Memory'], placed.map((m) => [m.name, m.state, bytes(m.memory_bytes)]), { empty: 'No model on this device.', label: `Models on ${device.id}` }),
        );
      }),
    );
  };
  page.append(h('h1', {}, 'Devices'), body);
  await refresh();
  return every(5000, refresh);
}

/** `#/nodes`: the cluster's nodes, their models and load (a single node lists itself). */
export async function nodes(page) {
  const body = h('div');
  const refresh = async () => {
    const { nodes } = await api('GET', '/v1/nodes');
    body.replaceChildren(
      table(
        ['Node', 'Address', 'State', 'Labels', 'Version', 'Started', 'Last heard', 'In flight', 'Models (queued)'],
        nodes.map((n) => {
          const report = n.report || {};
          return [
            n.name,
            h('code', {}, n.address),
            h('span', { class: `state ${n.state}` }, n.state),
            Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ') || '—',
            n.version,
            when(n.started_at),
            `${number(n.last_heartbeat_ms / 1000, 1)} s ago`,
            number(report.in_flight ?? 0),
            (report.models || []).map((m) => `${m.name} on ${m.device || '—'} (${m.queued})`).join(', ') || '—',
          ];
        }),
        { empty: 'No nodes have reported.', label: 'Nodes' },
      ),
    );
  };
  page.append(h('h1', {}, 'Nodes'), h('section', {}, body));
  await refresh();
  return every(2000, refresh);
}

/** Runs `refresh` every `ms` until the returned function is called. */
function every(ms, refresh) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await refresh();
      clearError();
    } catch (error) {
      // Shown until a later tick succeeds (the node may be restarting).
      showError(error);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
