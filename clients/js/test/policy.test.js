// The pure decisions, synchronously: close code -> action, backoff, event and ack decisions.
import { test } from "node:test";
import assert from "node:assert/strict";

import { closeAction, backoffDelay, eventDecision, ackDecision, BACKOFF, CLOSE_POLICY } from "../agentcast.js";

test("close codes: never 1000/1002/1003/1007/1008/1009/4003; 4001 refreshes only with getToken", () => {
  for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 4003]) assert.equal(closeAction(code), "stop", String(code));
  for (const code of [1001, 1006, 1011, 1012, 4008]) assert.equal(closeAction(code), "resume", String(code));
  assert.equal(closeAction(4029), "throttle");
  assert.equal(closeAction(4001), "stop");
  assert.equal(closeAction(4001, { canRefresh: true }), "refresh");
  assert.equal(closeAction(4321), "resume", "an unknown code reconnects with backoff");
  assert.ok(Object.isFrozen(CLOSE_POLICY));
});

test("backoff doubles, keeps half its ceiling, is capped, and throttles longer", () => {
  assert.equal(backoffDelay(0, "resume", 0), BACKOFF.initial / 2);
  assert.equal(backoffDelay(0, "resume", 0.999999) < BACKOFF.initial, true);
  assert.equal(backoffDelay(3, "resume", 0), (BACKOFF.initial * 8) / 2);
  assert.equal(backoffDelay(50, "resume", 0.999999) <= BACKOFF.max, true);
  assert.equal(backoffDelay(50, "resume", 0), BACKOFF.max / 2);
  assert.equal(backoffDelay(0, "throttle", 0), BACKOFF.throttleInitial / 2);
});

test("events: duplicates by seq, gaps, and compacted replays (data.from_seq)", () => {
  assert.equal(eventDecision(4, { seq: 5, data: {} }), "apply");
  assert.equal(eventDecision(4, { seq: 4, data: {} }), "duplicate");
  assert.equal(eventDecision(4, { seq: 2, data: {} }), "duplicate");
  assert.equal(eventDecision(4, { seq: 7, data: {} }), "gap");
  assert.equal(eventDecision(4, { seq: 9, data: { from_seq: 5 } }), "apply");
  assert.equal(eventDecision(4, { seq: 9, data: { from_seq: 6 } }), "gap");
  // Overlapping (from_seq <= last < seq): never applied twice; subscribe again from 4.
  assert.equal(eventDecision(4, { seq: 9, data: { from_seq: 3 } }), "gap");
  assert.equal(eventDecision(9, { seq: 9, data: { from_seq: 5 } }), "duplicate");
});

test("acks: resumed, resync, fresh, and runs in progress rebuilt once", () => {
  const ack = { seq: 12, epoch: "e", recovered: true };
  assert.deepEqual(ackDecision({ seq: 8, epoch: "e" }, ack), { kind: "resumed", seq: 8, rebuildFrom: null });
  assert.deepEqual(ackDecision({ seq: 8, epoch: "old" }, { ...ack, recovered: false }), { kind: "resync", seq: 12, rebuildFrom: null });
  assert.deepEqual(ackDecision(null, { ...ack, recovered: false }), { kind: "fresh", seq: 12, rebuildFrom: null });
  const running = { ...ack, recovered: false, active_runs: [{ run_id: "r2", first_seq: 9 }, { run_id: "r1", first_seq: 4 }] };
  assert.deepEqual(ackDecision(null, running), { kind: "fresh", seq: 3, rebuildFrom: 3 });
  assert.deepEqual(ackDecision({ seq: 1, epoch: "old" }, running), { kind: "resync", seq: 3, rebuildFrom: 3 });
  assert.deepEqual(ackDecision({ seq: 3, epoch: "e" }, running, true), { kind: "resync", seq: 12, rebuildFrom: null });
  assert.deepEqual(ackDecision(null, { ...ack, recovered: false, active_runs: [] }), { kind: "fresh", seq: 12, rebuildFrom: null });
});
