// Starts `agentcast serve --demo` on a free loopback port for one test file and stops it
// (SIGTERM, the path the CLI drains on; SIGKILL only if it does not exit in time).
import { spawn } from "node:child_process";
import { on, once } from "node:events";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../..");
// AGENTCAST_PYTHON: the interpreter with agentcast installed (CI: the repo's .venv).
const python = process.env.AGENTCAST_PYTHON ?? path.join(repo, ".venv/bin/python");
const STARTUP_MS = 20_000;
const STOP_MS = 10_000;

export async function startDemo({ speed = "0.5" } = {}) {
  const child = spawn(
    python,
    ["-m", "agentcast", "serve", "--demo", "--host", "127.0.0.1", "--port", "0",
     "--demo-speed", speed],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, PYTHONUNBUFFERED: "1" } },
  );
  let output = "";
  const started = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no demo server after ${STARTUP_MS} ms:\n${output}`)), STARTUP_MS);
    child.stdout.on("data", (data) => {
      output += data;
      const url = /agentcast listening on (http:\/\/\S+)/.exec(output)?.[1];
      const token = /demo token: (\S+)/.exec(output)?.[1];
      if (url && token) {
        clearTimeout(timer);
        resolve({ url, token });
      }
    });
    child.on("exit", (code) => reject(new Error(`demo server exited with ${code}:\n${output}`)));
  });
  const { url, token } = await started;
  return {
    url,
    token,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = once(child, "exit");
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), STOP_MS);
      await exited;
      clearTimeout(timer);
    },
  };
}

// The thread's events over agentcast's native protocol (the `ws` package): the ground truth
// of what the server did, independent of the protocol under test. Reads the retained history
// (subscribe with since_seq 0) and, with `until`, goes on live until an event matches it.
export async function history(server, threadId, { WebSocket, until } = {}) {
  const socket = new WebSocket(`${server.url.replace("http", "ws")}/ws?token=${server.token}`);
  await once(socket, "open");
  socket.send(JSON.stringify({ type: "subscribe", thread_id: threadId, since_seq: 0 }));
  const events = [];
  let latest = null;
  for await (const [data] of on(socket, "message")) {
    const frame = JSON.parse(String(data));
    if (frame.type === "subscribed") latest = frame.seq;
    else if (typeof frame.seq === "number") events.push(frame);
    const done = until ? events.some(until) : latest !== null && (events.at(-1)?.seq ?? 0) >= latest;
    if (done) break;
  }
  socket.close();
  return events;
}
