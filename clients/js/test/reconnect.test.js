// Reconnect policy by close code, against a real `agentcast serve`: never after 1009 or 4003;
// back off after 4029; refresh then reconnect after 4001 when getToken is given (stop without
// it); resume after 1001 (server restart: a new epoch, so onResync); refresh on token_expiring.
import { test } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../agentcast.js";
import { startServer, token, Recorder, finished, FAST, ADMIN_TOKEN } from "./server.js";

function watch(c) {
  const log = new Recorder();
  for (const name of ["open", "close", "reconnecting", "refreshed", "error"]) {
    c.on(name, (value) => log.push({ name, ...value }));
  }
  return log;
}
const named = (name) => (items) => items.filter((item) => item.name === name);
const has = (name, count = 1) => (items) => named(name)(items).length >= count;
const finalClose = (items) => items.some((item) => item.name === "close" && !item.willReconnect);

test("1009 (a frame over the size limit) closes for good: no reconnect", async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const c = connect(server.ws, { token: await token("js-1009"), backoff: FAST });
  t.after(() => c.close());
  const log = watch(c);
  await log.until(has("open"), "open");
  c.send({ type: "user_message", thread_id: "t1", text: "x".repeat(70000) });
  const items = await log.until(finalClose, "the close");
  assert.deepEqual(named("close")(items).map((i) => i.code), [1009]);
  assert.deepEqual(named("reconnecting")(items), []);
  assert.equal(c.state, "closed");
});

test("4003 (revoked) closes for good: no reconnect", async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const c = connect(server.ws, { token: await token("js-4003"), backoff: FAST });
  t.after(() => c.close());
  const log = watch(c);
  await log.until(has("open"), "open");
  const answer = await fetch(`${server.http}/admin/revoke?user=js-4003`, {
    method: "POST", headers: { Authorization: `Bearer ${ADMIN_TOKEN}` },
  });
  assert.equal(answer.status, 200);
  const items = await log.until(finalClose, "the close");
  assert.deepEqual(named("close")(items).map((i) => i.code), [4003]);
  assert.deepEqual(named("reconnecting")(items), []);
});

test("4029 (inbound flood) backs off at least half the throttle delay, then resumes", async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const c = connect(server.ws, { token: await token("js-4029"), backoff: FAST });
  t.after(() => c.close());
  const log = watch(c);
  await log.until(has("open"), "open");
  for (let i = 0; i < 60; i += 1) c.send({ type: "ping", id: i });
  const items = await log.until(has("open", 2), "the reopen");
  const [reconnecting] = named("reconnecting")(items);
  assert.equal(reconnecting.code, 4029);
  assert.ok(reconnecting.delay >= FAST.throttleInitial / 2, `delay ${reconnecting.delay}`);
  assert.ok(named("error")(items).some((e) => e.code === "rate_limited"));
  c.close();
});

test("4001 without getToken closes for good; with it, refreshes and reconnects", async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const user = "js-4001";
  const plain = connect(server.ws, { token: await token(user, { ttl: 1 }), backoff: FAST });
  const plainLog = watch(plain);
  const fresh = await token(user);
  const handed = [];
  const refreshing = connect(server.ws, {
    token: await token(user, { ttl: 1 }), backoff: FAST,
    // First answer a refresh that the server refuses (so the token expires), then a good one.
    getToken: () => { handed.push(handed.length ? fresh : "not-a-token"); return handed.at(-1); },
  });
  t.after(() => { plain.close(); refreshing.close(); });
  const log = watch(refreshing);
  const events = new Recorder();
  refreshing.subscribe("t1", { onEvent: (e) => events.push(e) });
  const plainItems = await plainLog.until(finalClose, "the plain client's close");
  assert.deepEqual(named("close")(plainItems).map((i) => i.code), [4001]);
  assert.deepEqual(named("reconnecting")(plainItems), []);
  const items = await log.until(has("open", 2), "the refreshing client's reopen");
  assert.ok(named("error")(items).some((e) => e.code === "bad_token"));
  assert.equal(named("reconnecting")(items)[0].code, 4001);
  assert.deepEqual(handed, ["not-a-token", fresh]);
  refreshing.send({ type: "user_message", thread_id: "t1", text: "still here" });
  const got = await events.until(finished, "a run after the reconnect");
  assert.equal(got.at(-1).type, "agent_completed");
  refreshing.close();
});

test("token_expiring: getToken's token is sent as refresh and accepted", async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fresh = await token("js-refresh", { ttl: 600 });
  const c = connect(server.ws, { token: await token("js-refresh", { ttl: 20 }), getToken: async () => fresh });
  t.after(() => c.close());
  const log = watch(c);
  const items = await log.until(has("refreshed"), "refreshed");
  const exp = JSON.parse(Buffer.from(fresh.split(".")[1], "base64url")).exp;
  assert.equal(named("refreshed")(items)[0].expiresAt, exp);
  assert.deepEqual(named("close")(items), []);
  c.close();
});

test("1001 (server restart): reconnects, and the new epoch is reported as a resync", async (t) => {
  let server = await startServer();
  const port = server.port;
  t.after(() => server.stop());
  const c = connect(server.ws, { token: await token("js-1001"), backoff: FAST });
  t.after(() => c.close());
  const log = watch(c);
  const events = new Recorder();
  const resyncs = new Recorder();
  c.subscribe("t1", { onEvent: (e) => events.push(e), onResync: (r) => resyncs.push(r) });
  c.send({ type: "user_message", thread_id: "t1", text: "before the restart" });
  const before = await events.until(finished, "the first run");
  const oldEpoch = c.subscriptions.get("t1").epoch;
  assert.equal(await server.stop(), 0);
  server = await startServer({ port });
  const [resync] = await resyncs.until((items) => items.length === 1, "onResync");
  assert.equal(named("close")(log.items)[0].code, 1001);
  assert.equal(resync.lastSeq, before.at(-1).seq);
  assert.notEqual(resync.epoch, oldEpoch);
  c.send({ type: "user_message", thread_id: "t1", text: "after the restart" });
  const all = await events.until((items) => items.length > before.length && finished(items.slice(before.length)), "the second run");
  assert.equal(all[before.length].seq, resync.seq + 1);
  c.close();
});
