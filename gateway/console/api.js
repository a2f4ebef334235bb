// The console's only way to the platform: the public HTTP API, called with
// the token the user signed in with. The token lives in this tab's session
// storage only: never in a URL, a cookie or local storage.

const TOKEN = 'gigafactory.token';

/** The signed-in token. */
export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN);
  },
  set token(token) {
    sessionStorage.setItem(TOKEN, token);
  },
  clear() {
    sessionStorage.removeItem(TOKEN);
  },
};

/** An error the API answered with: its status, code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * Sends a request with the session's token and returns the raw response.
 * `body` may be a string, a Blob/File (sent as is) or a value sent as JSON.
 */
export function request(method, path, { body, type, headers = {}, signal } = {}) {
  const init = { method, signal, headers: { ...headers } };
  if (session.token) init.headers.authorization = `Bearer ${session.token}`;
  if (body !== undefined) {
    if (typeof body === 'string' || body instanceof Blob) {
      init.body = body;
    } else {
      init.body = JSON.stringify(body);
      type = type ?? 'application/json';
    }
    if (type) init.headers['content-type'] = type;
  }
  return fetch(path, init);
}

/** Sends a request and returns its JSON body, or throws an ApiError. */
export async function api(method, path, options) {
  const response = await request(method, path, options);
  return answer(response);
}

/** A response's JSON body, or an ApiError for an error status. */
export async function answer(response) {
  const text = await response.text();
  let value = null;
  try {
    value = text ? JSON.parse(text) : null;
  } catch {
    value = text;
  }
  if (!response.ok) {
    const error = value && value.error;
    throw new ApiError(
      response.status,
      error ? error.code : null,
      error ? error.message : `${response.status} ${response.statusText}: ${text}`,
    );
  }
  return value;
}

/** Calls `onText` with each piece of a streamed body as it arrives. */
export async function readText(response, onText) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    onText(decoder.decode(value, { stream: true }));
  }
  const rest = decoder.decode();
  if (rest) onText(rest);
}

/** Calls `onLine` with each line of a streamed body as it arrives. */
export async function readLines(response, onLine) {
  let pending = '';
  await readText(response, (text) => {
    pending += text;
    for (let end = pending.indexOf('\n'); end >= 0; end = pending.indexOf('\n')) {
      onLine(pending.slice(0, end));
      pending = pending.slice(end + 1);
    }
  });
  if (pending) onLine(pending);
}
