// The real WebSocketChatTransport of the `ai` package from npm against `agentcast serve
// --demo` (subprotocol agentcast.vercel-ai): a chat turn, an abort, a resume after a drop.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { WebSocketChatTransport, readUIMessageStream } from "ai";
import WebSocket from "ws";
import { history, startDemo } from "../lib/server.mjs";

let server;
before(async () => { server = await startDemo(); });
after(async () => { await server?.stop(); });

function transport() {
  return new WebSocketChatTransport({
    url: `${server.url}/ws`,
    protocols: ["agentcast.vercel-ai"],
    params: { token: server.token },
    webSocket: WebSocket,
  });
}

const question = [{ id: "u1", role: "user", parts: [{ type: "text", text: "what is trio?" }] }];

function send(chat, chatId, abortSignal) {
  return chat.sendMessages({
    chatId, messages: question, trigger: "submit-message", messageId: undefined, abortSignal,
  });
}

async function lastMessage(stream) {
  let message;
  for await (const value of readUIMessageStream({ stream })) message = value;
  return message;
}

test("a chat turn streams the demo agent's answer as UI message parts", { timeout: 30_000 }, async () => {
  const chat = transport();
  const message = await lastMessage(await send(chat, "node-vercel-turn"));
  chat.close();
  const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  assert.match(text, /^I found 3 sources/);
  const tool = message.parts.find((p) => p.type === "dynamic-tool" || p.type?.startsWith("tool-"));
  assert.ok(tool, `a tool part in ${JSON.stringify(message.parts.map((p) => p.type))}`);
  assert.equal(tool.state, "output-available");
  assert.equal(tool.output.hits.length, 3);
  assert.ok(message.parts.some((p) => p.type === "reasoning"));
});

test("after a dropped socket the transport resumes the whole answer", { timeout: 30_000 }, async () => {
  const chatId = "node-vercel-resume";
  const chat = transport();
  const reader = (await send(chat, chatId)).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    assert.ok(!done, "the run ended before any text");
    if (value.type === "text-delta") break;
  }
  chat.close(); // the socket drops mid-answer
  await assert.rejects(reader.read());
  const again = transport();
  const stream = await again.reconnectToStream({ chatId });
  assert.ok(stream, "the run is still active, so the resume is a stream, not null");
  const message = await lastMessage(stream);
  again.close();
  const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  const events = await history(server, chatId, { WebSocket });
  assert.equal(text.trim(), events.find((e) => e.type === "agent_completed").data.result.answer);
  // Exactly the server's history text (its replay may be compacted: one agent_text frame
  // covering data.from_seq..seq), nothing skipped or repeated across the resume.
  const stored = events.filter((e) => e.type === "agent_text").map((e) => e.data.text).join("");
  assert.equal(text, stored);
});

test("an abort cancels the run on the server", { timeout: 30_000 }, async () => {
  const chatId = "node-vercel-abort";
  const chat = transport();
  const controller = new AbortController();
  const reader = (await send(chat, chatId, controller.signal)).getReader();
  const { value } = await reader.read();
  assert.equal(value.type, "start");
  controller.abort();
  // The run ends as cancelled (the server's own record, followed live); then nothing is active.
  const ended = (e) => ["agent_completed", "agent_cancelled", "agent_error"].includes(e.type);
  const terminal = (await history(server, chatId, { WebSocket, until: ended })).find(ended);
  assert.equal(terminal?.type, "agent_cancelled");
  assert.equal(await chat.reconnectToStream({ chatId }), null);
  chat.close();
});
