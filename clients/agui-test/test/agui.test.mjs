// The real @ag-ui/client HttpAgent from npm against `agentcast serve --demo`: a run streamed
// over POST /agui (SSE), a run aborted by the client and cancelled, a dropped stream resumed
// with Last-Event-ID.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { HttpAgent } from "@ag-ui/client";
import WebSocket from "ws";
import { history, startDemo } from "../lib/server.mjs";

let server;
before(async () => { server = await startDemo(); });
after(async () => { await server?.stop(); });

function agent(threadId, extraHeaders = {}) {
  return new HttpAgent({
    url: `${server.url}/agui`,
    threadId,
    headers: { Authorization: `Bearer ${server.token}`, ...extraHeaders },
    initialMessages: [{ id: "u1", role: "user", content: "what is structured concurrency?" }],
  });
}

test("HttpAgent runs the demo agent and builds the answer", { timeout: 30_000 }, async () => {
  const types = [];
  let finished;
  const { newMessages } = await agent("node-agui-stream").runAgent({}, {
    onEvent: ({ event }) => { types.push(event.type); },
    onRunFinishedEvent: ({ outcome }) => { finished = outcome; },
  });
  assert.equal(types[0], "RUN_STARTED");
  assert.equal(types.at(-1), "RUN_FINISHED");
  assert.equal(finished, "success");
  const answer = newMessages.find((m) => m.role === "assistant" && typeof m.content === "string" && m.content);
  assert.match(answer.content, /^I found 3 sources/);
  const call = newMessages.flatMap((m) => m.toolCalls ?? [])[0];
  assert.equal(call.function.name, "search");
  const result = newMessages.find((m) => m.role === "tool");
  assert.equal(result.toolCallId, call.id);
  assert.deepEqual(JSON.parse(result.content).hits.length, 3);
});

test("a dropped stream resumes with Last-Event-ID, then a cancel ends the run", { timeout: 30_000 }, async () => {
  const threadId = "node-agui-resume";
  const first = agent(threadId);
  let last;
  let runId;
  let text = "";
  await first.runAgent({}, {
    onRunStartedEvent: ({ event }) => { runId = event.runId; },
    onTextMessageContentEvent: ({ event }) => {
      text += event.delta;
      last = event.metadata;
      first.abortRun(); // the client drops the stream mid-answer
    },
  });
  assert.ok(last, "saw text before aborting");
  const resumed = agent(threadId, { "Last-Event-ID": `${last.seq}:${last.epoch}` });
  const seqs = [];
  let outcome;
  await resumed.runAgent({}, {
    onEvent: ({ event }) => { if (!event.metadata?.synthetic) seqs.push(event.metadata?.seq); },
    onTextMessageContentEvent: ({ event }) => { text += event.delta; },
    onRunFinishedEvent: ({ outcome: value }) => { outcome = value; },
  });
  assert.equal(seqs[0], last.seq + 1, "the resumed stream starts right after Last-Event-ID");
  assert.equal(outcome, "success");
  const events = await history(server, threadId, { WebSocket });
  const answer = events.find((e) => e.type === "agent_completed").data.result.answer;
  assert.equal(text.trim(), answer, "nothing lost or doubled across the drop");

  // Cancel: the client aborts its stream and asks the server to cancel the run.
  const cancelling = agent("node-agui-cancel");
  let cancelRun;
  let lastCancel;
  await cancelling.runAgent({}, {
    onRunStartedEvent: ({ event }) => { cancelRun = event.runId; },
    onEvent: ({ event }) => {
      if (event.metadata) lastCancel = event.metadata;
      if (event.type === "ACTIVITY_SNAPSHOT") cancelling.abortRun();
    },
  });
  const response = await fetch(`${server.url}/agui/cancel`, {
    method: "POST",
    headers: { Authorization: `Bearer ${server.token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ runId: cancelRun }),
  });
  assert.equal(response.status, 200);
  let cancelled;
  await agent("node-agui-cancel", { "Last-Event-ID": `${lastCancel.seq}:${lastCancel.epoch}` })
    .runAgent({}, { onRunFinishedEvent: ({ outcome: value }) => { cancelled = value; } });
  assert.equal(cancelled, "cancelled");
  assert.ok(runId);
});
