// The chat and embeddings playground on the OpenAI-compatible API, each
// request also written as the curl and Python lines that send it.

import { ApiError, api, answer, readLines, request } from './api.js';
import { button, field, h, number } from './dom.js';

/** `#/playground`. */
export async function view(page) {
  const { models } = await api('GET', '/v1/models');
  // Stops an answer still streaming when the view is left (its generation ends too).
  const left = new AbortController();
  const usable = models.filter((m) => m.state !== 'failed');
  const text = usable.filter((m) => m.generation || m.task === 'text-generation');
  const vectors = usable.filter((m) => m.task === 'embedding' || m.task === 'embeddings' || m.task === 'feature-extraction');
  page.append(h('h1', {}, 'Playground'));
  page.append(h('section', {}, h('h2', {}, 'Chat'), text.length ? chat(text, left.signal) : h('p', { class: 'muted' }, 'No text model is available to this tenant.')));
  page.append(
    h('section', {}, h('h2', {}, 'Embeddings'), vectors.length ? embeddings(vectors) : h('p', { class: 'muted' }, 'No embedding model is available to this tenant.')),
  );
  return () => left.abort();
}

function modelSelect(models, name) {
  return h('select', { name }, models.map((m) => h('option', { value: m.name }, m.name)));
}

/** A chat: system prompt, the conversation so far, parameters; answers streamed. */
function chat(models, signal) {
  const model = modelSelect(models, 'chat-model');
  const system = h('textarea', { name: 'system', rows: 2, placeholder: 'You are a helpful assistant.' });
  const message = h('textarea', { name: 'message', rows: 3, required: true });
  const maxTokens = h('input', { name: 'max_tokens', type: 'number', min: 1, value: 64 });
  const temperature = h('input', { name: 'temperature', type: 'number', min: 0, max: 2, step: 0.1, value: 0 });
  const stream = h('input', { name: 'stream', type: 'checkbox', checked: true });
  stream.checked = true;
  const transcript = h('div', { class: 'transcript', 'aria-live': 'polite', 'aria-label': 'Conversation' });
  const stats = h('p', { role: 'status', class: 'muted' });
  const code = h('pre', { class: 'light code', 'aria-label': 'The same request with curl and Python' });
  const history = [];
  const body = () => {
    const messages = [];
    if (system.value.trim()) messages.push({ role: 'system', content: system.value });
    messages.push(...history, { role: 'user', content: message.value });
    const asked = {
      model: model.value,
      messages,
      max_tokens: Number(maxTokens.value),
      temperature: Number(temperature.value),
      stream: stream.checked,
    };
    // The token counts arrive in a last chunk only when asked for.
    if (stream.checked) asked.stream_options = { include_usage: true };
    return asked;
  };
  const showCode = () => {
    code.textContent = equivalents('chat/completions', body(), 'chat.completions');
  };
  for (const input of [model, system, message, maxTokens, temperature, stream]) input.addEventListener('input', showCode);
  showCode();
  const send = button('Send', async () => {
    if (!message.reportValidity()) return;
    const asked = body();
    const reply = h('span', { class: 'assistant' });
    transcript.append(h('p', { class: 'user' }, h('strong', {}, 'You: '), message.value), h('p', {}, h('strong', {}, 'Assistant: '), reply));
    const started = performance.now();
    const response = await request('POST', '/v1/chat/completions', { body: asked, signal });
    if (!response.ok) await answer(response);
    let chunks = 0;
    let first = null;
    let finish = null;
    let usage = null;
    if (asked.stream) {
      await readLines(response, (line) => {
        if (!line.startsWith('data: ') || line === 'data: [DONE]') return;
        const chunk = JSON.parse(line.slice(6));
        // A stream that fails after it began ends with an error event.
        if (chunk.error) throw new ApiError(response.status, chunk.error.code, chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (chunk.usage) usage = chunk.usage;
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          first = first ?? performance.now() - started;
          chunks += 1;
          reply.append(choice.delta.content);
        }
        finish = choice.finish_reason || finish;
      });
    } else {
      const whole = await answer(response);
      reply.append(whole.choices[0].message.content || '');
      finish = whole.choices[0].finish_reason;
      usage = whole.usage;
      chunks = 1;
    }
    history.push({ role: 'user', content: asked.messages.at(-1).content }, { role: 'assistant', content: reply.textContent });
    const took = Math.round(performance.now() - started);
    stats.textContent = [
      `finish_reason ${finish}`,
      `${chunks} chunk${chunks === 1 ? '' : 's'}`,
      first === null ? null : `first token after ${Math.round(first)} ms`,
      `${took} ms in all`,
      usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : null,
    ]
      .filter(Boolean)
      .join(' · ');
    message.value = '';
    showCode();
  });
  const clear = button('New conversation', async () => {
    history.length = 0;
    transcript.replaceChildren();
    stats.textContent = '';
    showCode();
  }, { quiet: true });
  return h(
    'div',
    {},
    h('div', { class: 'row' }, field('Model', model), field('max_tokens', maxTokens), field('temperature', temperature), h('label', { class: 'check' }, stream, ' stream')),
    field('System prompt', system),
    transcript,
    field('Message', message),
    h('div', { class: 'actions' }, send, clear),
    stats,
    h('details', {}, h('summary', {}, 'The same request with curl and Python'), code),
  );
}

/** Embeddings of one input: dimensions, tokens, the first values. */
function embeddings(models) {
  const model = modelSelect(models, 'embedding-model');
  const input = h('textarea', { name: 'input', rows: 2, required: true });
  const output = h('pre', { class: 'light', 'aria-live': 'polite', 'aria-label': 'Embedding' });
  const code = h('pre', { class: 'light code' });
  const body = () => ({ model: model.value, input: input.value });
  const showCode = () => {
    code.textContent = equivalents('embeddings', body(), 'embeddings');
  };
  model.addEventListener('input', showCode);
  input.addEventListener('input', showCode);
  showCode();
  const send = button('Embed', async () => {
    if (!input.reportValidity()) return;
    const result = await api('POST', '/v1/embeddings', { body: body() });
    const vector = result.data[0].embedding;
    output.textContent = `${vector.length} dimensions · ${result.usage.prompt_tokens} tokens\n[${vector
      .slice(0, 8)
      .map((v) => number(v, 4))
      .join(', ')}, …]`;
  });
  return h(
    'div',
    {},
    h('div', { class: 'row' }, field('Model', model)),
    field('Input', input),
    send,
    output,
    h('details', {}, h('summary', {}, 'The same request with curl and Python'), code),
  );
}

/** The curl and Python (openai client) lines that send `body` to `endpoint`. */
function equivalents(endpoint, body, method) {
  const base = `${location.origin}/v1`;
  const json = JSON.stringify(body, null, 2);
  const python = Object.entries(body)
    .map(([key, value]) => `    ${key}=${pythonValue(value)},`)
    .join('\n');
  return [
    `curl ${base}/${endpoint} \\`,
    `  -H "Authorization: Bearer $GIGAFACTORY_TOKEN" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d '${json.replaceAll("'", "'\\''")}'`,
    '',
    'import os',
    'from openai import OpenAI',
    `client = OpenAI(base_url="${base}", api_key=os.environ["GIGAFACTORY_TOKEN"])`,
    `result = client.${method}.create(`,
    python,
    ')',
  ].join('\n');
}

/** A JSON value as a Python literal. */
function pythonValue(value) {
  if (value === true) return 'True';
  if (value === false) return 'False';
  if (value === null) return 'None';
  if (Array.isArray(value)) return `[${value.map(pythonValue).join(', ')}]`;
  if (typeof value === 'object') {
    return `{${Object.entries(value)
      .map(([key, item]) => `${JSON.stringify(key)}: ${pythonValue(item)}`)
      .join(', ')}}`;
  }
  return JSON.stringify(value);
}
