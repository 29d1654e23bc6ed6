// Test helpers: a real `agentcast serve` subprocess, tokens from `agentcast token`, and
// bounded waits driven by callbacks (never by sleeping).
//
// The Python interpreter is $AGENTCAST_PYTHON, else the repository's .venv/bin/python (what
// .ci/run creates). Servers listen on 127.0.0.1 only.
import { spawn, execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.AGENTCAST_PYTHON ?? path.join(ROOT, ".venv/bin/python");
export const SECRET = "a-test-secret-that-is-long-enough-for-hs256";
export const ADMIN_TOKEN = "an-admin-token-that-is-long-enough-for-the-server";
/** Bound of every wait on the server, in ms. */
export const WAIT_MS = 20000;

/** Start `agentcast serve --demo` with a known secret; resolves once it listens. */
export function startServer({ port = 0, speed = 4 } = {}) {
  const args = [
    "-m", "agentcast", "serve", "--demo", "--host", "127.0.0.1", "--port", String(port),
    "--secret", SECRET, "--admin-token", ADMIN_TOKEN, "--demo-speed", String(speed),
    "--log-level", "WARNING",
  ];
  const child = spawn(PYTHON, args, { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (chunk) => { stderr += chunk; });
  const exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
  return bounded(new Promise((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const match = /agentcast listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(out);
      if (match) {
        const bound = Number(match[1]);
        resolve({
          port: bound,
          http: `http://127.0.0.1:${bound}`,
          ws: `ws://127.0.0.1:${bound}/ws`,
          exited,
          /** SIGTERM: drains every connection with 1001; resolves with the exit status. */
          stop: () => { child.kill("SIGTERM"); return bounded(exited, "server exit"); },
        });
      }
    });
    exited.then((code) => reject(new Error(`agentcast serve exited ${code}: ${stderr}`)));
  }), "server start");
}

/** A token for `user` from `agentcast token`. */
export function token(user, { ttl = 3600 } = {}) {
  return bounded(new Promise((resolve, reject) => {
    execFile(PYTHON, ["-m", "agentcast", "token", "--user", user, "--secret", SECRET, "--ttl", String(ttl)],
      (error, stdout, stderr) => (error ? reject(new Error(stderr || String(error))) : resolve(stdout.trim())));
  }), "token");
}

/** Reject if `promise` takes longer than `ms`. */
export function bounded(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Records values and resolves waits on a condition over them (with a copy of the values
 * then); call `push` from callbacks. */
export class Recorder {
  constructor() { this.items = []; this.waits = []; }
  push(item) {
    this.items.push(item);
    this.waits = this.waits.filter(({ cond, resolve }) => (cond(this.items) ? (resolve([...this.items]), false) : true));
  }
  until(cond, what) {
    if (cond(this.items)) return Promise.resolve([...this.items]);
    return bounded(new Promise((resolve) => this.waits.push({ cond, resolve })), what);
  }
}

export const TERMINAL = new Set(["agent_completed", "agent_error", "agent_cancelled"]);
/** True once `events` hold a terminal event. */
export const finished = (events) => events.some((event) => TERMINAL.has(event.type));

/** A test backoff: quick, but the same shape as the default. */
export const FAST = { initial: 50, throttleInitial: 400, max: 1000, stableAfter: 10000 };

/** The same seqs a contiguous run would have: first..last, each once. */
export function contiguous(seqs) {
  return seqs.every((seq, index) => index === 0 || seq === seqs[index - 1] + 1);
}

/**
 * Whether events cover their seqs without gap or overlap: each starts (at data.from_seq, for a
 * compacted replay of agent_text, else at its seq) right after the previous one's seq.
 */
export function covering(events) {
  return events.every((e, index) => index === 0
    || (typeof e.data?.from_seq === "number" ? e.data.from_seq : e.seq) === events[index - 1].seq + 1);
}

/** Each run's agent_text joined, keyed by run id. */
export function runTexts(events) {
  const texts = {};
  for (const e of events) {
    if (e.type === "agent_text" && e.run_id) texts[e.run_id] = (texts[e.run_id] ?? "") + e.data.text;
  }
  return texts;
}
