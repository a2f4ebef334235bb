// The operator's tenants: the list with create, and one tenant's quota
// (validated by the platform, its message shown as is), keys and deletion.

import { api } from './api.js';
import { keySection } from './account.js';
import { NAME_PATTERN, bytes, button, field, h, number, table, when } from './dom.js';

/** `#/tenants`. */
export async function list(page) {
  const rows = h('div');
  const refresh = async () => {
    const { tenants } = await api('GET', '/v1/tenants');
    rows.replaceChildren(
      table(
        ['Tenant', 'Created', 'Functions', 'Stored', 'Quota'],
        tenants.map((t) => [
          h('a', { href: `#/tenants/${encodeURIComponent(t.name)}` }, t.name),
          when(t.created_at),
          number(t.usage && t.usage.functions),
          bytes(t.usage && t.usage.stored_bytes),
          Object.keys(t.quota || {}).length ? `${Object.keys(t.quota).length} limits set` : 'platform defaults',
        ]),
        { empty: 'No tenants yet.', label: 'Tenants' },
      ),
    );
  };
  const name = h('input', { name: 'tenant', required: true, pattern: NAME_PATTERN, maxlength: 63, spellcheck: 'false' });
  const status = h('p', { role: 'status' });
  const create = button('Create tenant', async () => {
    if (!name.reportValidity()) return;
    const tenant = await api('POST', '/v1/tenants', { body: { name: name.value } });
    status.replaceChildren('Created ', h('a', { href: `#/tenants/${encodeURIComponent(tenant.name)}` }, tenant.name), '.');
    name.value = '';
    await refresh();
  });
  page.append(
    h('h1', {}, 'Tenants'),
    h('section', {}, h('h2', {}, 'New tenant'), h('div', { class: 'row' }, field('Name', name, 'Lowercase letters, digits and dashes.')), create, status),
    h('section', {}, rows),
  );
  await refresh();
}

// The quota's fields: [key, label, hint]; empty means the platform default.
const LIMITS = [
  ['max_functions', 'Functions', 'How many functions it may have'],
  ['max_stored_bytes', 'Stored bytes', 'Wasm and files of all its versions'],
  ['max_memory_mib', 'Memory per instance (MiB)', ''],
  ['max_concurrency', 'Concurrent requests', 'Of all its functions at once'],
  ['requests_per_second', 'Requests per second', 'Sustained'],
  ['burst', 'Burst', 'Requests above the rate at once'],
  ['compute_seconds_per_minute', 'Model compute seconds per minute', ''],
  ['generated_tokens_per_minute', 'Generated tokens per minute', ''],
  ['max_model_memory_mib', 'Memory of its own graphs (MiB)', ''],
  ['max_outbound_connections', 'Outbound connections', ''],
  ['max_model_bytes', 'Private model bytes', ''],
];

/** `#/tenants/NAME`. */
export async function detail(page, { params: [name] }) {
  const path = `/v1/tenants/${encodeURIComponent(name)}`;
  const [tenant, { models }] = await Promise.all([api('GET', path), api('GET', '/v1/models')]);
  page.append(
    h('p', {}, h('a', { href: '#/tenants' }, '← Tenants')),
    h('h1', {}, name),
    h(
      'section',
      {},
      h('h2', {}, 'Use'),
      h(
        'dl',
        { class: 'facts' },
        h('dt', {}, 'Functions'),
        h('dd', {}, number(tenant.usage.functions)),
        h('dt', {}, 'Stored'),
        h('dd', {}, bytes(tenant.usage.stored_bytes)),
        h('dt', {}, 'Private models'),
        h('dd', {}, bytes(tenant.usage.model_bytes)),
      ),
    ),
    quotaForm(path, tenant.quota || {}, models.filter((m) => !m.owner).map((m) => m.name)),
    await keySection(name),
    h(
      'section',
      {},
      button('Delete tenant', async () => {
        if (!confirm(`Delete ${name} with its functions, keys and private models?`)) return;
        await api('DELETE', path);
        location.hash = '#/tenants';
      }, { quiet: true }),
    ),
  );
}

function quotaForm(path, quota, modelNames) {
  const inputs = LIMITS.map(([key, label, hint]) => {
    const input = h('input', { name: key, type: 'number', min: 0, step: 'any', value: quota[key] ?? '', placeholder: 'default' });
    return [key, field(label, input, hint), input];
  });
  const everyPublic = h('input', { type: 'checkbox', name: 'public-models' });
  everyPublic.checked = !quota.models;
  const choices = modelNames.map((model) => {
    const box = h('input', { type: 'checkbox', name: 'model', value: model });
    box.checked = Boolean(quota.models && quota.models.includes(model));
    return [model, box];
  });
  const status = h('p', { role: 'status' });
  const save = button('Save quota', async () => {
    const next = {};
    for (const [key, , input] of inputs) {
      if (input.value !== '') next[key] = Number(input.value);
    }
    if (!everyPublic.checked) next.models = choices.filter(([, box]) => box.checked).map(([model]) => model);
    status.textContent = '';
    await api('PUT', `${path}/quota`, { body: next });
    status.replaceChildren(h('span', { class: 'ok' }, 'Saved.'));
  });
  return h(
    'section',
    {},
    h('h2', {}, 'Quota'),
    h('p', { class: 'muted' }, 'Empty fields take the platform default. The platform checks every value and says what it refused.'),
    h('div', { class: 'row' }, inputs.map(([, element]) => element)),
    h(
      'fieldset',
      {},
      h('legend', {}, 'Models it may use'),
      h('label', { class: 'check' }, everyPublic, ' every public model'),
      choices.map(([model, box]) => h('label', { class: 'check' }, box, ` ${model}`)),
    ),
    save,
    status,
  );
}
