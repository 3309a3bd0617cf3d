// Drives the real AI SDK client (`ai` v7) against a UI message stream endpoint, for conformance tests.
//
// Protocol: one JSON command on stdin, one JSON result on stdout, exit code 0 whenever a result was
// printed (even when the request or the stream failed: failures are data for the test). A malformed
// command or a bug in this script exits non-zero with the reason on stderr.
//
//   {"mode": "send", "api": "http://127.0.0.1:8000/v1/chats", "headers": {...}, "chatId": "...",
//    "messages": [UIMessage, ...], "trigger": "submit-message" | "regenerate-message",
//    "messageId": "..."?, "body": {...}?, "abortAfterChunks": N?}
//   {"mode": "reconnect", "api": "...", "headers": {...}, "chatId": "..."}
//   {"mode": "assemble", "chunks": [UIMessageChunk, ...]}   (chunks a test already received)
//
//   -> {"message": UIMessage | null, "chunks": [UIMessageChunk, ...], "error": string | null,
//       "httpStatus": number | null, "aborted": boolean, "noActiveStream": boolean}
//
//   {"mode": "chat", "api": "...", "headers": {...}, "chatId": "...", "messages": [UIMessage, ...]?,
//    "actions": [{"do": "send", "text": "..."} | {"do": "regenerate", "messageId": "..."?}
//                | {"do": "resume"} | {"do": "approve", "approved": bool, "reason": "..."?}
//                | {"do": "tool-output", "output": any}, ...],
//    "body": {...}?, "prepareSendMessagesRequest": "<JS source of the function>"?,
//    "origin": "http://app.example"?}
//
//   -> {"messages": [UIMessage, ...], "status": string, "error": string | null,
//       "responses": [{"method", "url", "status", "browserVisibleHeaders": {...}}]}
//
//   "chat" drives the library's own chat state machine (`AbstractChat`, which `useChat` wraps) with
//   the given messages loaded, running each action to its end in turn, as a user clicking would.
//   With "origin", every request carries that Origin and each response's headers are reduced to
//   what a browser page on that origin could read (CORS: the safelisted headers and those in
//   Access-Control-Expose-Headers, and nothing unless Access-Control-Allow-Origin admits it); a
//   preflight is sent first, as a browser would, and a refused one fails the request.
//
// The transport and the assembler are the library's own (`DefaultChatTransport`,
// `readUIMessageStream`), so what this reports is what `useChat` would see, not what a hand-written
// parser believes.

import { AbstractChat, DefaultChatTransport, readUIMessageStream } from 'ai';

async function readCommand() {
  const parts = [];
  for await (const part of process.stdin) parts.push(part);
  const command = JSON.parse(Buffer.concat(parts).toString('utf8'));
  if (command === null || typeof command !== 'object') throw new Error('the command must be a JSON object');
  if (command.mode === 'assemble') {
    if (!Array.isArray(command.chunks)) throw new Error('"chunks" must be an array');
    return command;
  }
  if (!['send', 'reconnect', 'chat'].includes(command.mode)) {
    throw new Error(`unknown mode ${JSON.stringify(command.mode)}; expected "send", "reconnect", "chat" or "assemble"`);
  }
  if (command.mode === 'chat' && !Array.isArray(command.actions)) throw new Error('"actions" must be an array');
  if (typeof command.api !== 'string' || typeof command.chatId !== 'string') {
    throw new Error('"api" and "chatId" must be strings');
  }
  const n = command.abortAfterChunks;
  if (n != null && !(Number.isInteger(n) && n >= 0)) throw new Error('"abortAfterChunks" must be an integer >= 0');
  return command;
}

// undici reports connection failures as `TypeError: fetch failed` with the useful part in `cause`.
function describeError(error) {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause instanceof Error ? `: ${error.cause.message}` : '';
  return `${error.message}${cause}`;
}

// Reads `stream` with the library's assembler, recording every chunk in arrival order.
//
// The recorder is a pass-through stage rather than a `tee()`: with one reader, "abort after N chunks"
// cuts the stream exactly after the Nth chunk reached the assembler, whereas two tee branches are
// drained independently and the assembled message could lag the recorded chunks.
async function assemble(stream, { abortAfterChunks, abortController }) {
  const chunks = [];
  const errors = [];
  let aborted = false;

  const recorder = new TransformStream({
    transform(chunk, controller) {
      chunks.push(chunk);
      controller.enqueue(chunk);
      if (abortAfterChunks != null && chunks.length >= abortAfterChunks) {
        aborted = true;
        // terminate() delivers the chunks already queued and then closes, so the assembler ends
        // cleanly with everything received so far; aborting the fetch closes the connection the way
        // `useChat().stop()` does, which is what the server has to cope with.
        controller.terminate();
        abortController.abort();
      }
    },
  });

  let message = null;
  const snapshots = readUIMessageStream({
    stream: stream.pipeThrough(recorder),
    // Called for `error` chunks, for chunks that fail the schema (unknown type, bad fields) and for
    // protocol violations such as a delta without its start. Without terminateOnError the assembler
    // keeps reading, as `useChat` does, so later chunks are still recorded.
    onError: (error) => errors.push(describeError(error)),
  });
  for await (const snapshot of snapshots) message = snapshot;
  return { message, chunks, error: errors[0] ?? null, aborted };
}

// The simplest ChatState: plain fields, as a framework binding would keep them in its own store.
class PlainChatState {
  constructor(messages) {
    this.status = 'ready';
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage = (message) => { this.messages = [...this.messages, message]; };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  };
  snapshot = (thing) => structuredClone(thing);
}

class PlainChat extends AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new PlainChatState(messages ?? []) });
  }
}

const CORS_SAFELISTED_RESPONSE_HEADERS = [
  'cache-control', 'content-language', 'content-length', 'content-type', 'expires', 'last-modified', 'pragma',
];

// What a page on `origin` could read of a response's headers under CORS.
function browserVisibleHeaders(response, origin) {
  const allowed = response.headers.get('access-control-allow-origin');
  if (allowed !== '*' && allowed !== origin) return {};
  const exposed = (response.headers.get('access-control-expose-headers') ?? '')
    .split(',').map((name) => name.trim().toLowerCase()).filter(Boolean);
  const visible = {};
  for (const [name, value] of response.headers) {
    if (CORS_SAFELISTED_RESPONSE_HEADERS.includes(name) || exposed.includes('*') || exposed.includes(name)) visible[name] = value;
  }
  return visible;
}

// A fetch that records each response, and with an origin behaves as a browser's cross-origin fetch
// does: the preflight first, the Origin header, and only the headers CORS lets the page read.
function recordingFetch(responses, origin) {
  return async (url, init = {}) => {
    const method = init.method ?? 'GET';
    const headers = new Headers(init.headers ?? {});
    if (origin) {
      const requested = [...headers.keys()];
      const preflight = await fetch(url, {
        method: 'OPTIONS',
        headers: {
          Origin: origin,
          'Access-Control-Request-Method': method,
          'Access-Control-Request-Headers': requested.join(','),
        },
      });
      const allowOrigin = preflight.headers.get('access-control-allow-origin');
      if (!preflight.ok || (allowOrigin !== '*' && allowOrigin !== origin)) {
        throw new TypeError(`Failed to fetch: the preflight of ${method} ${url} was refused (${preflight.status})`);
      }
      headers.set('Origin', origin);
    }
    const response = await fetch(url, { ...init, headers });
    const seen = origin ? browserVisibleHeaders(response, origin) : Object.fromEntries(response.headers);
    responses.push({ method, url: String(url), status: response.status, browserVisibleHeaders: seen });
    return response;
  };
}

async function runChat(command) {
  const responses = [];
  const prepareSendMessagesRequest = command.prepareSendMessagesRequest
    ? (0, eval)(`(${command.prepareSendMessagesRequest})`)
    : undefined;
  const chat = new PlainChat({
    id: command.chatId,
    messages: command.messages,
    transport: new DefaultChatTransport({
      api: command.api,
      headers: command.headers ?? {},
      body: command.body ?? {},
      prepareSendMessagesRequest,
      fetch: recordingFetch(responses, command.origin),
    }),
  });
  for (const action of command.actions) {
    if (action.do === 'send') await chat.sendMessage({ text: action.text, ...(action.files ? { files: action.files } : {}) });
    else if (action.do === 'regenerate') await chat.regenerate(action.messageId ? { messageId: action.messageId } : undefined);
    else if (action.do === 'resume') await chat.resumeStream();
    else if (action.do === 'approve') {
      // As a user clicking "approve" or "deny" on the pending tool call, then the library's own
      // follow-up request (the one `sendAutomaticallyWhen` would send).
      const part = chat.lastMessage?.parts.find((p) => p.state === 'approval-requested');
      if (part == null) throw new Error('no tool call waits for approval in the last message');
      await chat.addToolApprovalResponse({ id: part.approval.id, approved: action.approved, reason: action.reason });
      await chat.sendMessage();
    } else if (action.do === 'tool-output') {
      // As a page's `onToolCall` that ran a client-side tool and hands its output back.
      const part = chat.lastMessage?.parts.find((p) => p.state === 'input-available');
      if (part == null) throw new Error('no client-side tool call waits for its output in the last message');
      await chat.addToolOutput({ tool: part.type.replace(/^tool-/, ''), toolCallId: part.toolCallId, output: action.output });
      await chat.sendMessage();
    } else throw new Error(`unknown action ${JSON.stringify(action)}`);
    if (chat.status === 'error') break;
  }
  return {
    messages: chat.messages,
    status: chat.status,
    error: chat.error ? describeError(chat.error) : null,
    responses,
  };
}

async function run(command) {
  if (command.mode === 'chat') return runChat(command);
  const transport = new DefaultChatTransport({
    api: command.api,
    headers: command.headers ?? {},
    body: command.body ?? {},
  });
  const abortController = new AbortController();
  const empty = { message: null, chunks: [], error: null, httpStatus: null, aborted: false, noActiveStream: false };

  if (command.mode === 'assemble') {
    // Chunks gathered across reconnections (or crashes) assembled as one stream, as useChat would.
    const given = new ReadableStream({
      start(controller) {
        for (const chunk of command.chunks) controller.enqueue(chunk);
        controller.close();
      },
    });
    return { ...empty, ...(await assemble(given, { abortAfterChunks: null, abortController })) };
  }

  let stream;
  try {
    if (command.mode === 'reconnect') {
      stream = await transport.reconnectToStream({ chatId: command.chatId, abortSignal: abortController.signal });
      if (stream === null) return { ...empty, noActiveStream: true };
    } else {
      stream = await transport.sendMessages({
        chatId: command.chatId,
        messages: command.messages ?? [],
        trigger: command.trigger ?? 'submit-message',
        messageId: command.messageId ?? undefined,
        abortSignal: abortController.signal,
      });
    }
  } catch (error) {
    // Non-2xx answers arrive as APICallError whose message is the response body.
    return { ...empty, error: describeError(error), httpStatus: error?.statusCode ?? null };
  }

  if (command.abortAfterChunks === 0) {
    abortController.abort();
    await stream.cancel().catch(() => {});
    return { ...empty, aborted: true };
  }
  return { ...empty, ...(await assemble(stream, { abortAfterChunks: command.abortAfterChunks, abortController })) };
}

let command;
try {
  command = await readCommand();
} catch (error) {
  process.stderr.write(`ai_client: bad command: ${describeError(error)}\n`);
  process.exit(2);
}
const result = await run(command);
// Exit explicitly once stdout is flushed: keep-alive sockets or an aborted body must not hold the
// process open after the answer is out.
process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
