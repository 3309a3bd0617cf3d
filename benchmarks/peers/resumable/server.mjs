// The resumable peer of durachat's turn-latency benchmark: the recipe the AI SDK documents for
// resumable chat ("Chatbot Resume Streams"), on plain node:http.
//
//   node server.mjs --port P      (REDIS_URL and DATABASE_URL in the environment)
//
// POST /v1/chats takes durachat's send body ({message, model: "local/lorem", providerOptions:
// {local: {words, delayMs}}}) and answers with the same lorem words at the same pace as durachat's
// `local` provider (providers/local.py), as a UI message stream:
//
// - the chat and the user message are stored in Postgres before the stream starts;
// - `createUIMessageStream` writes the chunks; `pipeUIMessageStreamToResponse` sends them as SSE
//   and hands a copy to `consumeSseStream`, which registers it with `resumable-stream` (a Redis
//   SUBSCRIBE and SET per stream; chunks go through Redis only while someone resumes) and stores
//   the stream id as the chat's active stream;
// - `onEnd` stores the assistant message and clears the active stream before `[DONE]` is sent.
//
// GET /v1/chats/:id/stream resumes the chat's active stream, or answers 204 when there is none.
//
// What the recipe does not do, and durachat does: the answer is produced inside this process, so
// it dies with it (resumable-stream keeps the chunks in the producer's memory); nothing retries a
// failed generation; there is no stop route, no auth, no limits, no queue of turns per chat.

import { randomUUID } from "node:crypto";
import { createServer } from "node:http";
import { setImmediate, setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import { createUIMessageStream, pipeUIMessageStreamToResponse, UI_MESSAGE_STREAM_HEADERS } from "ai";
import pg from "pg";
import { createClient } from "redis";
import { createResumableStreamContext } from "resumable-stream";

const MODEL = "local/lorem";
// providers/local.py: the same words, the same limits on what one request may ask for.
const LOREM_WORDS = (
  "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut " +
  "labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco " +
  "laboris nisi ut aliquip ex ea commodo consequat duis aute irure dolor in reprehenderit in " +
  "voluptate velit esse cillum dolore eu fugiat nulla pariatur excepteur sint occaecat cupidatat " +
  "non proident sunt in culpa qui officia deserunt mollit anim id est laborum"
).split(" ");
const DEFAULT_WORDS = 50;
const DEFAULT_DELAY_MS = 20;
const MAX_WORDS = 10_000;
const MAX_DELAY_MS = 10_000;
const MAX_BODY_BYTES = 1024 * 1024;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS peer_chat (
  id text PRIMARY KEY,
  active_stream_id text,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS peer_message (
  id text PRIMARY KEY,
  chat_id text NOT NULL REFERENCES peer_chat (id),
  role text NOT NULL,
  parts jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
`;

class BadRequest extends Error {}

/** `words` pieces of lorem ipsum, as `lorem_pieces` in providers/local.py builds them. */
function loremPieces(words) {
  const pieces = [];
  for (let index = 0; index < words; index++) {
    const word = LOREM_WORDS[index % LOREM_WORDS.length];
    pieces.push(index === 0 ? word[0].toUpperCase() + word.slice(1) : ` ${word}`);
  }
  return pieces;
}

/** `{words, delayMs}` from providerOptions.local, refused as providers/local.py refuses them. */
function parsePace(options) {
  const words = options.words ?? DEFAULT_WORDS;
  const delayMs = options.delayMs ?? DEFAULT_DELAY_MS;
  if (!Number.isInteger(words) || words < 0 || words > MAX_WORDS) {
    throw new BadRequest(`providerOptions.local.words must be an integer from 0 to ${MAX_WORDS}`);
  }
  if (typeof delayMs !== "number" || !(delayMs >= 0 && delayMs <= MAX_DELAY_MS)) {
    throw new BadRequest(`providerOptions.local.delayMs must be a number of milliseconds from 0 to ${MAX_DELAY_MS}`);
  }
  return { words, delayMs };
}

function parseSend(body) {
  if (typeof body?.message !== "string" || body.message.length === 0) {
    throw new BadRequest("message must be a non-empty string");
  }
  if (body.model !== MODEL) {
    throw new BadRequest(`this peer serves only ${MODEL}`);
  }
  return { text: body.message, pace: parsePace(body.providerOptions?.local ?? {}) };
}

async function readJson(request) {
  let size = 0;
  const parts = [];
  for await (const part of request) {
    size += part.length;
    if (size > MAX_BODY_BYTES) throw new BadRequest("request body too large");
    parts.push(part);
  }
  try {
    return JSON.parse(Buffer.concat(parts).toString("utf8"));
  } catch {
    throw new BadRequest("the body is not JSON");
  }
}

/** The model: the same chunks durachat streams for `local/lorem`, one text part, paced like it. */
async function writeLorem(writer, { words, delayMs }, metadata) {
  const partId = randomUUID();
  writer.write({ type: "start", messageMetadata: metadata });
  writer.write({ type: "start-step" });
  for (const [index, piece] of loremPieces(words).entries()) {
    if (index === 0) {
      writer.write({ type: "text-start", id: partId });
    } else if (delayMs > 0) {
      await sleep(delayMs);
    } else {
      // local.py's asyncio.sleep(0): let the event loop run between deltas even with no pause.
      await setImmediate();
    }
    writer.write({ type: "text-delta", id: partId, delta: piece });
  }
  if (words > 0) writer.write({ type: "text-end", id: partId });
  writer.write({ type: "finish-step" });
  writer.write({ type: "finish", finishReason: "stop" });
}

async function inTransaction(pool, work) {
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    await work(client);
    await client.query("COMMIT");
  } catch (error) {
    await client.query("ROLLBACK").catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}

function insertMessage(client, chatId, message) {
  return client.query(
    "INSERT INTO peer_message (id, chat_id, role, parts) VALUES ($1, $2, $3, $4)",
    [message.id, chatId, message.role, JSON.stringify(message.parts)],
  );
}

function createApp({ pool, streamContext }) {
  async function send(request, response) {
    const { text, pace } = parseSend(await readJson(request));
    const chatId = randomUUID();
    const userMessage = { id: randomUUID(), role: "user", parts: [{ type: "text", text }] };
    await inTransaction(pool, async (client) => {
      await client.query("INSERT INTO peer_chat (id) VALUES ($1)", [chatId]);
      await insertMessage(client, chatId, userMessage);
    });

    // Set by consumeSseStream, which pipeUIMessageStreamToResponse calls before any chunk flows;
    // onEnd waits for it, so a short answer cannot clear the active stream before it is set.
    let registered = Promise.resolve();
    const stream = createUIMessageStream({
      originalMessages: [userMessage],
      generateId: randomUUID,
      execute: ({ writer }) => writeLorem(writer, pace, { chatId, model: MODEL }),
      onEnd: async ({ responseMessage }) => {
        await registered;
        await inTransaction(pool, async (client) => {
          await insertMessage(client, chatId, responseMessage);
          await client.query("UPDATE peer_chat SET active_stream_id = NULL WHERE id = $1", [chatId]);
        });
      },
    });
    await pipeUIMessageStreamToResponse({
      response,
      stream,
      headers: { "X-Chat-Id": chatId },
      consumeSseStream: ({ stream: copy }) => {
        registered = (async () => {
          const streamId = randomUUID();
          await streamContext.createNewResumableStream(streamId, () => copy);
          await pool.query("UPDATE peer_chat SET active_stream_id = $2 WHERE id = $1", [chatId, streamId]);
        })().catch((error) => console.error("resumable stream not registered:", error));
      },
    });
  }

  async function resume(response, chatId) {
    const { rows } = await pool.query("SELECT active_stream_id FROM peer_chat WHERE id = $1", [chatId]);
    const streamId = rows[0]?.active_stream_id;
    const stream = streamId ? await streamContext.resumeExistingStream(streamId) : null;
    if (!stream) {
      response.writeHead(204).end();
      return;
    }
    response.writeHead(200, { ...UI_MESSAGE_STREAM_HEADERS, "X-Chat-Id": chatId });
    const reader = stream.getReader();
    response.once("close", () => reader.cancel().catch(() => {}));
    for (;;) {
      const { done, value } = await reader.read();
      if (done || response.destroyed) break;
      response.write(value);
    }
    response.end();
  }

  return async (request, response) => {
    const { pathname } = new URL(request.url, "http://peer");
    try {
      if (request.method === "POST" && pathname === "/v1/chats") {
        await send(request, response);
      } else if (request.method === "GET" && pathname.startsWith("/v1/chats/") && pathname.endsWith("/stream")) {
        await resume(response, decodeURIComponent(pathname.slice("/v1/chats/".length, -"/stream".length)));
      } else if (request.method === "GET" && pathname === "/readyz") {
        response.writeHead(200, { "content-type": "application/json" }).end('{"status":"ok"}');
      } else {
        response.writeHead(404, { "content-type": "application/json" }).end('{"detail":"not found"}');
      }
    } catch (error) {
      const status = error instanceof BadRequest ? 400 : 500;
      if (status === 500) console.error(error);
      if (!response.headersSent) {
        response.writeHead(status, { "content-type": "application/json" });
        response.end(JSON.stringify({ detail: status === 400 ? error.message : "internal error" }));
      } else {
        response.destroy();
      }
    }
  };
}

async function main() {
  const { values } = parseArgs({
    options: { host: { type: "string", default: "127.0.0.1" }, port: { type: "string" } },
  });
  const { REDIS_URL: redisUrl, DATABASE_URL: databaseUrl } = process.env;
  if (!values.port || !redisUrl || !databaseUrl) {
    throw new Error("usage: REDIS_URL=... DATABASE_URL=... node server.mjs --port P");
  }

  const pool = new pg.Pool({ connectionString: databaseUrl });
  await pool.query(SCHEMA);
  const publisher = createClient({ url: redisUrl });
  const subscriber = publisher.duplicate();
  await Promise.all([publisher.connect(), subscriber.connect()]);
  // A long-lived server: nothing to keep alive past the response (`waitUntil` is for serverless).
  const streamContext = createResumableStreamContext({ waitUntil: null, publisher, subscriber });

  const server = createServer(createApp({ pool, streamContext }));
  await new Promise((resolve) => server.listen(Number(values.port), values.host, resolve));

  const stop = async () => {
    server.close();
    server.closeIdleConnections();
    await Promise.allSettled([pool.end(), publisher.close(), subscriber.close()]);
    process.exit(0);
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
