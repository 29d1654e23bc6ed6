// The client against a real `agentcast serve --demo`: a run streams whole and in order, a
// dropped connection resumes with no gap, a "reload" (a new client on the same storage)
// resumes, `recovered: false` calls onResync, and duplicate seqs are dropped.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../agentcast.js";
import { startServer, token, Recorder, finished, FAST, contiguous, covering, runTexts } from "./server.js";

class MapStorage {
  constructor() { this.map = new Map(); }
  getItem(key) { return this.map.get(key) ?? null; }
  setItem(key, value) { this.map.set(key, String(value)); }
  removeItem(key) { this.map.delete(key); }
}

let server;
before(async () => { server = await startServer({ speed: 4 }); });
after(async () => { await server.stop(); });

const clients = [];
after(() => { for (const c of clients) c.close(); });

async function client(user, options = {}) {
  const storage = options.storage ?? new MapStorage();
  const c = connect(server.ws, { token: await token(user), storage, backoff: FAST, ...options });
  clients.push(c);
  const opens = new Recorder();
  c.on("open", (info) => opens.push(info));
  await opens.until((items) => items.length === 1, "open");
  return { c, opens, storage };
}

test("a run streams whole, in seq order, over a batched connection", async () => {
  const { c, opens } = await client("js-stream");
  const events = new Recorder();
  const runs = [];
  c.subscribe("t1", { onEvent: (e) => events.push(e), onRun: (r) => runs.push(r.status) });
  c.send({ type: "user_message", thread_id: "t1", text: "what is trio?" });
  const got = await events.until(finished, "the run's terminal event");
  assert.equal(opens.items[0].protocol, "agentcast.ndjson");
  assert.equal(got[0].type, "agent_started");
  assert.equal(got.at(-1).type, "agent_completed");
  assert.ok(contiguous(got.map((e) => e.seq)));
  assert.equal(got[0].seq, 1);
  assert.deepEqual(runs, ["running", "completed"]);
  assert.ok(got.filter((e) => e.type === "agent_text").map((e) => e.data.text).join("").includes("I found 3 sources"));
  c.close();
});

test("batch: false speaks agentcast.v1, one frame per message", async () => {
  const { c, opens } = await client("js-plain", { batch: false });
  const events = new Recorder();
  c.subscribe("t1", { onEvent: (e) => events.push(e) });
  c.send({ type: "user_message", thread_id: "t1", text: "plain" });
  const got = await events.until(finished, "the run's terminal event");
  assert.equal(opens.items[0].protocol, "agentcast.v1");
  assert.ok(contiguous(got.map((e) => e.seq)));
  c.close();
});

test("a connection dropped mid-run resumes with no gap and no duplicate", async () => {
  const { c, opens } = await client("js-drop");
  const events = new Recorder();
  const reconnecting = [];
  const resyncs = [];
  c.on("reconnecting", (info) => reconnecting.push(info));
  c.subscribe("t1", { onEvent: (e) => events.push(e), onResync: (r) => resyncs.push(r) });
  c.send({ type: "user_message", thread_id: "t1", text: "drop me" });
  await events.until((items) => items.some((e) => e.type === "agent_thinking"), "thinking");
  c.drop();
  await opens.until((items) => items.length === 2, "the second open");
  const got = await events.until(finished, "the run's terminal event");
  const seqs = got.map((e) => e.seq);
  assert.equal(seqs[0], 1);
  assert.ok(contiguous(seqs), `a gap or duplicate in ${seqs}`);
  assert.equal(got.at(-1).type, "agent_completed");
  assert.equal(reconnecting.length, 1);
  assert.deepEqual(resyncs, []);
  c.close();
});

test("a reload (a new client on the same storage) resumes where the last one stopped", async () => {
  const first = await client("js-reload");
  const before = new Recorder();
  first.c.subscribe("t1", { onEvent: (e) => before.push(e) });
  first.c.send({ type: "user_message", thread_id: "t1", text: "reload" });
  await before.until((items) => items.some((e) => e.type === "tool_executing"), "a tool call");
  first.c.close();
  const lastSeen = before.items.at(-1).seq;
  const second = await client("js-reload", { storage: first.storage });
  const after = new Recorder();
  const resyncs = [];
  second.c.subscribe("t1", { onEvent: (e) => after.push(e), onResync: (r) => resyncs.push(r) });
  const got = await after.until(finished, "the run's terminal event");
  // The replay may be compacted: a frame then covers data.from_seq..seq.
  assert.equal(got[0].data?.from_seq ?? got[0].seq, lastSeen + 1);
  assert.ok(covering(got), "every seq covered once, in order");
  const answer = got.at(-1).data.result.answer;
  assert.equal(Object.values(runTexts([...before.items, ...got])).join("").trim(), answer);
  assert.deepEqual(resyncs, []);
  second.c.close();
});

test("recovered: false (an epoch the server does not know) calls onResync, then streams live", async () => {
  const storage = new MapStorage();
  storage.setItem("agentcast:thread:t1", JSON.stringify({ seq: 5, epoch: "not-this-epoch" }));
  const { c } = await client("js-resync", { storage });
  const resyncs = new Recorder();
  const events = new Recorder();
  const sub = c.subscribe("t1", { onEvent: (e) => events.push(e), onResync: (r) => resyncs.push(r) });
  const [resync] = await resyncs.until((items) => items.length === 1, "onResync");
  assert.equal(resync.threadId, "t1");
  assert.equal(resync.lastSeq, 5);
  assert.notEqual(resync.epoch, "not-this-epoch");
  assert.equal(sub.epoch, resync.epoch);
  c.send({ type: "user_message", thread_id: "t1", text: "after the resync" });
  const got = await events.until(finished, "the run's terminal event");
  assert.equal(got[0].seq, resync.seq + 1);
  assert.deepEqual(JSON.parse(storage.getItem("agentcast:thread:t1")), { seq: got.at(-1).seq, epoch: resync.epoch });
  c.close();
});

test("duplicate seqs are dropped: a replay of what was applied reaches onEvent once", async () => {
  const { c } = await client("js-dup");
  const events = new Recorder();
  const sub = c.subscribe("t1", { onEvent: (e) => events.push(e) });
  c.send({ type: "user_message", thread_id: "t1", text: "twice" });
  const got = await events.until(finished, "the run's terminal event");
  const count = got.length;
  // Ask the server for the whole stream again: every event it replays is one already applied.
  const errors = new Recorder();
  c.on("error", (e) => errors.push(e));
  c.send({ type: "subscribe", thread_id: "t1", since_seq: 0, epoch: sub.epoch });
  c.send({ type: "ping", id: "after-replay" });
  c.send({ type: "user_message", thread_id: "t1", text: "again" });
  const all = await events.until((items) => items.length > count && finished(items.slice(count)), "the second run");
  // The replay is compacted (one agent_text frame may cover data.from_seq..seq), so it has
  // at most as many frames as were applied; every one of them is a duplicate by its seq.
  assert.ok(c.stats.duplicates > 0 && c.stats.duplicates <= count, `${c.stats.duplicates} of ${count}`);
  assert.ok(contiguous(all.map((e) => e.seq)), "each seq once, in order");
  // Nothing applied twice: each run's text is its answer exactly once.
  const texts = runTexts(all);
  const answers = all.filter((e) => e.type === "agent_completed").map((e) => [e.run_id, e.data.result.answer]);
  assert.equal(answers.length, 2);
  for (const [run, answer] of answers) assert.equal(texts[run].trim(), answer);
  assert.deepEqual(errors.items, []);
  c.close();
});
