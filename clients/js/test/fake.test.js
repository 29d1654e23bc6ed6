// What the server does not send yet (heartbeat, active_runs, compacted replays) and what it
// cannot be made to do on demand (stay silent to pings), against a scripted WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../agentcast.js";
import { Recorder } from "./server.js";

/** A WebSocket double: opens on the next turn, records what is sent, closes when told. */
function fakeSockets() {
  const sockets = new Recorder();
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.protocol = protocols[0];
      this.sent = new Recorder();
      sockets.push(this);
      setTimeout(() => this.onopen?.(), 0);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code = 1000, reason = "") { setTimeout(() => this.onclose?.({ code, reason }), 0); }
    deliver(...frames) { this.onmessage?.({ data: frames.map((f) => JSON.stringify(f)).join("\n") }); }
  }
  return { sockets, FakeSocket };
}

const event = (seq, type = "agent_text", data = { text: `e${seq}` }, runId = "r1") => ({
  type, thread_id: "t1", run_id: runId, seq, ts: 0, data,
});

test("a peer that answers no ping is dropped and the client reconnects and resumes", async () => {
  const { sockets, FakeSocket } = fakeSockets();
  const c = connect("ws://fake/ws", {
    WebSocket: FakeSocket, pingInterval: 10, pongTimeout: 10, backoff: { initial: 1 },
  });
  const reconnecting = new Recorder();
  c.on("reconnecting", (info) => reconnecting.push(info));
  const events = new Recorder();
  c.subscribe("t1", { onEvent: (e) => events.push(e) });
  const [first] = await sockets.until((s) => s.length === 1, "a socket");
  await first.sent.until((sent) => sent.some((f) => f.type === "subscribe"), "subscribe");
  first.deliver({ type: "subscribed", thread_id: "t1", seq: 0, epoch: "e", recovered: false }, event(1));
  await first.sent.until((sent) => sent.some((f) => f.type === "ping"), "a ping");
  const [, second] = await sockets.until((s) => s.length === 2, "the reconnect");
  assert.equal(reconnecting.items[0].code, 4000);
  const [resume] = await second.sent.until((sent) => sent.length >= 1, "the resume");
  assert.deepEqual(resume, { type: "subscribe", thread_id: "t1", since_seq: 1, epoch: "e" });
  c.close();
});

test("heartbeats count as liveness and are not events; batches split on newlines", async () => {
  const { sockets, FakeSocket } = fakeSockets();
  const c = connect("ws://fake/ws", { WebSocket: FakeSocket, pingInterval: 10, pongTimeout: 30 });
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const events = new Recorder();
  c.subscribe("t1", { onEvent: (e) => events.push(e) });
  const [socket] = await sockets.until((s) => s.length === 1, "a socket");
  await socket.sent.until((sent) => sent.length === 1, "subscribe");
  socket.deliver(
    { type: "subscribed", thread_id: "t1", seq: 0, epoch: "e", recovered: false },
    { type: "heartbeat" }, event(1), event(2), event(2),
  );
  await socket.sent.until((sent) => sent.filter((f) => f.type === "ping").length >= 1, "a ping");
  socket.deliver({ type: "heartbeat" });
  await socket.sent.until((sent) => sent.filter((f) => f.type === "ping").length >= 2, "another ping");
  assert.equal(sockets.items.length, 1, "still the first socket");
  assert.deepEqual(events.items.map((e) => e.seq), [1, 2]);
  assert.equal(c.stats.duplicates, 1);
  assert.deepEqual(errors, []);
  c.close();
});

test("active_runs on a fresh page replays the run in progress; a compacted replay applies once", async () => {
  const { sockets, FakeSocket } = fakeSockets();
  const c = connect("ws://fake/ws", { WebSocket: FakeSocket });
  const events = new Recorder();
  const runs = [];
  const sub = c.subscribe("t1", { onEvent: (e) => events.push(e), onRun: (r) => runs.push([r.runId, r.status]) });
  const [socket] = await sockets.until((s) => s.length === 1, "a socket");
  await socket.sent.until((sent) => sent.length === 1, "subscribe");
  assert.deepEqual(socket.sent.items[0], { type: "subscribe", thread_id: "t1" });
  socket.deliver({ type: "subscribed", thread_id: "t1", seq: 9, epoch: "e", recovered: false,
    active_runs: [{ run_id: "r1", first_seq: 6 }] });
  const sent = await socket.sent.until((items) => items.length === 2, "the rebuild subscribe");
  assert.deepEqual(sent[1], { type: "subscribe", thread_id: "t1", since_seq: 5, epoch: "e" });
  socket.deliver(
    { type: "subscribed", thread_id: "t1", seq: 9, epoch: "e", recovered: true,
      active_runs: [{ run_id: "r1", first_seq: 6 }] },
    event(6, "agent_started", { agent_name: "a" }),
    event(8, "agent_text", { text: "ab", from_seq: 7 }),
    event(9, "agent_text", { text: "c" }),
    event(10, "agent_completed", { result: null, duration_ms: 1 }),
  );
  const got = await events.until((items) => items.length === 4, "the run");
  assert.deepEqual(got.map((e) => e.seq), [6, 8, 9, 10]);
  assert.equal(got.filter((e) => e.type === "agent_text").map((e) => e.data.text).join(""), "abc");
  assert.equal(sub.activeRuns.size, 0);
  assert.deepEqual(runs.at(-1), ["r1", "completed"]);
  assert.equal(socket.sent.items.length, 2, "rebuilt once, not again on the second ack");
  c.close();
});
