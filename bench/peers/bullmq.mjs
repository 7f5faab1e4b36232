// BullMQ side of `make bench`: `jobs` no-op jobs through one queue on a Redis the bench started
// (persistence off), `workers` Worker instances of concurrency 1, timed from the first add to
// the last completion. Every job is a Redis hash that BullMQ keeps after completion, so it
// tracks each job as the handler does.
import { Queue, Worker } from "bullmq";
import { parseArgs, report, submitAll } from "./args.mjs";

const a = parseArgs(process.argv.slice(2));
const jobs = Number(a.jobs), workers = Number(a.workers), batch = Number(a.batch ?? 100);
const inflight = Number(a.inflight ?? (a.mode === "batched" ? 4 : 32));
const connection = { host: "127.0.0.1", port: Number(a["redis-port"]) };
const name = `bench-${process.pid}`;
const queue = new Queue(name, { connection });
await queue.waitUntilReady();

let done = 0;
let finish;
const finished = new Promise((resolve) => (finish = resolve));
const pool = [];
for (let w = 0; w < workers; w++) {
  const worker = new Worker(name, async () => null, { connection, concurrency: 1 });
  worker.on("completed", () => {
    done += 1;
    if (done === jobs) finish();
  });
  await worker.waitUntilReady();
  pool.push(worker);
}

const started = process.hrtime.bigint();
await submitAll({
  jobs, mode: a.mode, batch, inflight,
  addOne: (i) => queue.add("noop", { i }),
  addMany: (lo, hi) =>
    queue.addBulk(Array.from({ length: hi - lo }, (_, k) => ({ name: "noop", data: { i: lo + k } }))),
});
const submitted = process.hrtime.bigint();
await finished;
const ended = process.hrtime.bigint();
const seconds = Number(ended - started) / 1e9;
report({
  peer: "bullmq", mode: a.mode, jobs, workers, seconds,
  submit_seconds: Number(submitted - started) / 1e9, jobs_per_second: jobs / seconds,
});
await Promise.all(pool.map((w) => w.close()));
await queue.obliterate({ force: true });
await queue.close();
