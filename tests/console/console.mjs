// Drives the web console in Debian's headless Chromium, as a tenant and as
// the operator, and prints what it saw as JSON for tests/console.rs to
// check. Run by that test, which starts the server and passes:
//   GIGAFACTORY_URL, GIGAFACTORY_ADMIN, GIGAFACTORY_KEY (tenant acme),
//   GIGAFACTORY_OTHER (another tenant, whose name must never reach acme's
//   pages), GIGAFACTORY_HELLO (hello.wasm), GIGAFACTORY_SECOND (another
//   build of hello, deployed as its second version), GIGAFACTORY_CHROMIUM,
//   GIGAFACTORY_SHOTS (where screenshots go).

import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/console.rs sets it)`);
  return value;
};
const BASE = env('GIGAFACTORY_URL');
const ADMIN = env('GIGAFACTORY_ADMIN');
const KEY = env('GIGAFACTORY_KEY');
const OTHER = env('GIGAFACTORY_OTHER');
const HELLO = env('GIGAFACTORY_HELLO');
const SECOND = env('GIGAFACTORY_SECOND');
const SHOTS = env('GIGAFACTORY_SHOTS');
const MODEL = 'smollm2-135m-instruct';

const report = { requests: [], outside: [], leaks: [], page_errors: [] };
const step = (name) => process.stderr.write(`console test: ${name}\n`);

const browser = await chromium.launch({
  executablePath: env('GIGAFACTORY_CHROMIUM'),
  args: ['--headless', '--no-sandbox', '--disable-background-networking'],
});
try {
  await run(browser);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report));

async function run(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  page.on('pageerror', (error) => report.page_errors.push(String(error)));
  // Browsers log every error status a page's fetch gets; the one the
  // test provokes (a quota out of range) is expected.
  let refusal = null;
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    if (refusal && refusal.test(message.text())) return;
    report.page_errors.push(message.text());
  });
  page.on('dialog', (dialog) => dialog.accept());
  // Every request the page makes, and what the tenant's pages were told.
  let watching = null;
  page.on('request', (request) => {
    if (!request.url().startsWith(BASE)) report.outside.push(request.url());
  });
  page.on('response', async (response) => {
    const type = response.headers()['content-type'] || '';
    const url = response.url();
    if (watching !== 'tenant') return;
    report.requests.push(`${response.request().method()} ${url.slice(BASE.length)}`);
    if (type.includes('x-ndjson') || type.includes('event-stream')) return;
    const body = await response.text().catch(() => '');
    if (body.includes(OTHER)) report.leaks.push(`${url}: ${body.slice(0, 200)}`);
  });

  step('the tenant signs in');
  watching = 'tenant';
  await page.goto(`${BASE}/console/`);
  await page.getByLabel('API key or admin token').fill(KEY);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Functions' }).waitFor();
  report.tenant_nav = await page.locator('#nav a').allTextContents();
  report.token_in_url = page.url().includes(KEY);
  report.token_in_local_storage = await page.evaluate((key) => JSON.stringify(localStorage).includes(key), KEY);

  step('deploys hello by upload');
  await page.locator('#deploy-file').setInputFiles(HELLO);
  await page.getByRole('button', { name: 'Deploy' }).click();
  report.deployed = await page.getByText(/^Deployed hello version \d+\.$/).textContent();
  await page.getByRole('link', { name: 'hello', exact: true }).click();
  await page.getByRole('heading', { name: 'Invoke' }).waitFor();

  step('invokes it in the playground and sees its log line live');
  await page.getByLabel('Path').fill('/from-the-console');
  await page.getByRole('button', { name: 'Send' }).click();
  const body = page.getByLabel('Response body');
  await body.filter({ hasText: 'You asked for /from-the-console' }).waitFor();
  report.invoke_body = await body.textContent();
  const log = page.getByLabel('Function log');
  await log.filter({ hasText: 'hello served /from-the-console' }).waitFor();
  report.log = await log.textContent();
  await page.screenshot({ path: `${SHOTS}/console-function.png`, fullPage: true });
  await page.locator('#nav a', { hasText: 'Functions' }).click();
  await page.getByRole('table', { name: 'Functions' }).waitFor();
  report.functions_row = await page.getByRole('table', { name: 'Functions' }).locator('tbody tr').first().locator('td').allTextContents();

  step('deploys a second version and rolls back to the first');
  await page.locator('#deploy-file').setInputFiles(SECOND);
  await page.getByLabel('Name').fill('hello');
  await page.getByRole('button', { name: 'Deploy' }).click();
  report.second = await page.getByText('Deployed hello version 2.').textContent();
  await page.getByRole('link', { name: 'hello', exact: true }).click();
  const kind = page.locator('[data-kind]');
  await kind.waitFor();
  report.kind_v2 = await kind.textContent();
  await page.getByRole('button', { name: 'Activate version 1' }).click();
  await page.getByRole('button', { name: 'Activate version 2' }).waitFor();
  report.kind_rolled_back = await kind.textContent();
  report.versions_after_rollback = await page
    .getByRole('table', { name: 'Versions' })
    .locator('tbody tr')
    .evaluateAll((rows) => rows.map((row) => row.cells[0].textContent + ' ' + row.cells[4].textContent));

  step('chats in the playground and sees the tokens stream');
  await page.getByRole('link', { name: 'Playground' }).click();
  await page.getByLabel('System prompt').fill('You are a helpful assistant.');
  await page.getByLabel('Message').fill('What is the capital of France?');
  await page.getByLabel('max_tokens').fill('24');
  report.chat_code = await page.locator('pre.code').first().textContent();
  // Counts the times text was added to the answer while it streamed.
  await page.evaluate(() => {
    window.appended = 0;
    new MutationObserver((changes) => {
      for (const change of changes) {
        if (change.target.classList && change.target.classList.contains('assistant')) window.appended += 1;
      }
    }).observe(document.querySelector('.transcript'), { childList: true, subtree: true });
  });
  await page.getByRole('button', { name: 'Send' }).first().click();
  await page.getByText(/finish_reason \w+/).waitFor();
  report.chat_answer = await page.locator('.assistant').textContent();
  report.chat_appended = await page.evaluate(() => window.appended);
  report.chat_stats = await page.getByText(/finish_reason \w+/).textContent();
  await page.getByLabel('Input').fill('A man is playing a guitar.');
  await page.getByRole('button', { name: 'Embed' }).click();
  const embedding = page.getByLabel('Embedding');
  await embedding.filter({ hasText: 'dimensions' }).waitFor();
  report.embedding = await embedding.textContent();
  await page.screenshot({ path: `${SHOTS}/console-playground.png`, fullPage: true });

  step('creates a key, sees it work, revokes it and sees it fail');
  await page.getByRole('link', { name: 'Keys' }).click();
  await page.getByRole('button', { name: 'Create key' }).click();
  const created = await page.locator('[data-secret="key"]').textContent();
  report.new_key_before = (await call('GET', '/fn/acme/hello', created)).status;
  const id = created.slice(0, 'gf_'.length + 8);
  await page.getByRole('button', { name: `Revoke ${id}` }).click();
  await page.getByText(`Revoked ${id}…`).waitFor();
  report.new_key_after = (await call('GET', '/fn/acme/hello', created)).status;
  await page.screenshot({ path: `${SHOTS}/console-keys.png`, fullPage: true });

  step('sees its usage and models');
  await page.getByRole('link', { name: 'Usage' }).click();
  await page.getByRole('table', { name: 'Usage totals' }).waitFor();
  report.usage_rows = await page.getByRole('table', { name: 'Usage totals' }).locator('tbody tr').allTextContents();
  report.usage_charts = await page.locator('svg.chart').count();
  await page.screenshot({ path: `${SHOTS}/console-usage.png`, fullPage: true });
  await page.getByRole('link', { name: 'Models' }).click();
  await page.locator('section.model').first().waitFor();
  report.tenant_models = await page.locator('section.model').evaluateAll((models) => models.map((m) => m.getAttribute('aria-label')));
  // An operator's view by its address: the tenant is sent to its own.
  await page.goto(`${BASE}/console/#/tenants`);
  await page.getByRole('heading', { name: 'Functions' }).waitFor();
  report.tenant_sent_to = new URL(page.url()).hash;
  await page.setViewportSize({ width: 390, height: 844 });
  report.phone_overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: `${SHOTS}/console-phone.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByLabel('API key or admin token').waitFor();
  watching = null;
  report.token_after_signout = await page.evaluate(() => sessionStorage.length);

  step('the operator signs in with the keyboard');
  await page.getByLabel('API key or admin token').waitFor();
  report.focused_on_signin = await page.evaluate(() => document.activeElement && document.activeElement.name);
  await page.keyboard.type(ADMIN);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Tenants' }).waitFor();
  report.operator_nav = await page.locator('#nav a').allTextContents();

  step('creates a tenant and sets its quota');
  await page.getByLabel('Name').fill('initech');
  await page.getByRole('button', { name: 'Create tenant' }).click();
  await page.getByRole('link', { name: 'initech' }).first().click();
  await page.getByRole('heading', { name: 'Quota' }).waitFor();
  await page.getByLabel('Memory per instance (MiB)').fill('999999999');
  refusal = /status of 400/;
  await page.getByRole('button', { name: 'Save quota' }).click();
  await page.locator('#error').waitFor({ state: 'visible' });
  report.quota_refused = await page.locator('#error').textContent();
  refusal = null;
  await page.getByLabel('Memory per instance (MiB)').fill('');
  await page.getByLabel('Requests per second').fill('50');
  await page.getByLabel('Burst').fill('10');
  await page.getByRole('button', { name: 'Save quota' }).click();
  await page.getByText('Saved.').waitFor();
  report.quota_saved = (await call('GET', '/v1/tenants/initech', ADMIN)).body.quota;
  await page.screenshot({ path: `${SHOTS}/console-tenant.png`, fullPage: true });

  step("sees a model's queue rise under load");
  await page.getByRole('link', { name: 'Models' }).click();
  const queued = page.locator(`[data-queued="${MODEL}"]`);
  await queued.waitFor();
  report.queued_before = Number(await queued.textContent());
  const load = Array.from({ length: 32 }, () =>
    call('POST', '/v1/chat/completions', KEY, {
      model: MODEL,
      messages: [{ role: 'user', content: 'Count from one to fifty in words.' }],
      max_tokens: 96,
    }),
  );
  await page.waitForFunction((model) => Number(document.querySelector(`[data-queued="${model}"]`).textContent) > 0, MODEL);
  report.queued_under_load = Number(await queued.textContent());
  await page.screenshot({ path: `${SHOTS}/console-models.png`, fullPage: true });
  report.load_statuses = [...new Set((await Promise.all(load)).map((r) => r.status))];
  const byTenant = page.locator(`[data-tenants="${MODEL}"]`);
  await byTenant.filter({ hasText: 'acme:' }).waitFor();
  report.model_by_tenant = await byTenant.textContent();

  step('sees devices, nodes and every tenant\'s usage');
  await page.getByRole('link', { name: 'Devices' }).click();
  await page.getByRole('heading', { name: /^cpu/ }).waitFor();
  report.devices = await page.locator('h2').allTextContents();
  await page.screenshot({ path: `${SHOTS}/console-devices.png`, fullPage: true });
  await page.getByRole('link', { name: 'Usage' }).click();
  await page.getByRole('table', { name: 'Usage totals' }).waitFor();
  report.operator_usage_tenants = await page
    .getByRole('table', { name: 'Usage totals' })
    .locator('tbody tr td:first-child')
    .allTextContents();
}

/** A request from outside the browser: status and JSON body. */
async function call(method, path, token, body) {
  const response = await fetch(`${BASE}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  return { status: response.status, body: parsed };
}
