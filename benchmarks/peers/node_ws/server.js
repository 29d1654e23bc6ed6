// node-ws peer of the agentcast benchmark: Node's `ws` package (8.x, pinned by
// package-lock.json; `npm ci` in this directory), speaking benchmarks/protocol.py.
//
// A Map of user -> Map(connection -> subscribed threads), the event JSON encoded once per event
// and handed to every subscribed connection of the user with ws.send(). That is ws's fast path:
// send() frames the message and writes it to the socket at once (no task hop, no queue of its
// own), and Node's stream layer coalesces what the kernel does not take yet. ws has no
// message batching; the event loop emits several events of a paced tick in one go, as every
// peer does. No permessage-deflate (the load generator offers none, as to every peer).
//
// Usage: node server.js [--lifetime S]; prints its port on the first line of stdout.
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

const TICK = 5; // ms, protocol.TICK
const OVERHEAD = 150; // protocol._OVERHEAD

const lifetimeArg = process.argv.indexOf('--lifetime');
const lifetime = lifetimeArg > 0 ? Number(process.argv[lifetimeArg + 1]) : 1800;
setTimeout(() => process.exit(3), lifetime * 1000).unref();

const users = new Map();

function due(b, elapsed) {
  if (b.schedule) {
    let n = 0;
    while (n < b.schedule.length && b.schedule[n] / 1000 <= elapsed) n++;
    return Math.min(n, b.count);
  }
  if (!(b.rate > 0)) return b.count;
  return Math.min(b.count, Math.floor(elapsed * b.rate) + 1);
}

function pause(b, elapsed, sent) {
  if (b.schedule) {
    return sent < b.schedule.length ? Math.max(0, b.schedule[sent] - elapsed * 1000) : 0;
  }
  return Math.max(TICK, (sent / b.rate - elapsed) * 1000);
}

function sendToThread(user, threadId, message) {
  const conns = users.get(user);
  if (!conns) return;
  for (const [ws, threads] of conns) {
    if (threads.has(threadId) && ws.readyState === ws.OPEN) ws.send(message);
  }
}

function emit(user, frame) {
  const b = {
    count: Number(frame.count), rate: Number(frame.rate || 0), schedule: frame.schedule || null,
  };
  if (b.schedule) b.count = Math.min(b.count, b.schedule.length);
  const threadId = String(frame.thread_id);
  const kind = frame.event || 'agent_thinking';
  const pad = 'x'.repeat(Math.max(0, Number(frame.size || 200) - OVERHEAD));
  const start = Date.now();
  let n = 0;
  const step = () => {
    const target = due(b, (Date.now() - start) / 1000);
    while (n < target) {
      n++;
      const ts = Date.now() / 1000;
      sendToThread(user, threadId, JSON.stringify({
        type: kind, thread_id: threadId, run_id: null, seq: n, ts,
        data: { text: pad, n, u: user, t: ts },
      }));
    }
    if (n < b.count) setTimeout(step, pause(b, (Date.now() - start) / 1000, n));
  };
  step();
}

const server = http.createServer();
const wss = new WebSocketServer({ server, perMessageDeflate: false, clientTracking: false });

wss.on('connection', (ws, request) => {
  const user = new URL(request.url, 'http://x').searchParams.get('user') || 'anonymous';
  if (!users.has(user)) users.set(user, new Map());
  users.get(user).set(ws, new Set());
  ws.on('message', (raw) => {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      ws.close(1007, 'invalid JSON');
      return;
    }
    if (frame.type === 'subscribe') {
      users.get(user).get(ws).add(String(frame.thread_id));
      ws.send(JSON.stringify({ type: 'subscribed', thread_id: frame.thread_id }));
    } else if (frame.type === 'bench_burst') {
      emit(user, frame);
    }
  });
  ws.on('close', () => {
    const conns = users.get(user);
    if (!conns) return;
    conns.delete(ws);
    if (conns.size === 0) users.delete(user);
  });
  ws.on('error', () => {});
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});
