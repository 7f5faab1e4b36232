// graphile-worker side of `make bench`: `jobs` no-op jobs in a schema of their own on the
// machine's PostgreSQL, one runner of concurrency `workers`, timed from the first add to the
// last success. Batched adds go through graphile-worker's own `add_jobs` SQL function (this
// version has no JavaScript helper for it); single adds through `addJob`.
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import { parseArgs, report, submitAll } from "./args.mjs";

const a = parseArgs(process.argv.slice(2));
const jobs = Number(a.jobs), workers = Number(a.workers), batch = Number(a.batch ?? 100);
const inflight = Number(a.inflight ?? (a.mode === "batched" ? 4 : 32));
const connectionString = a["database-url"];
const schema = a.schema ?? `bench_graphile_${process.pid}`;
// Quiet: a log line per job would cost graphile-worker time that the handler does not spend.
const logger = new Logger(() => () => {});

const utils = await makeWorkerUtils({ connectionString, schema, logger });
await utils.migrate();

let done = 0;
let finish;
const finished = new Promise((resolve) => (finish = resolve));
const runner = await run({
  connectionString, schema, concurrency: workers, noHandleSignals: true, pollInterval: 1000, logger,
  maxPoolSize: workers + inflight + 2,
  taskList: { noop: async () => {} },
});
runner.events.on("job:success", () => {
  done += 1;
  if (done === jobs) finish();
});

const started = process.hrtime.bigint();
await submitAll({
  jobs, mode: a.mode, batch, inflight,
  addOne: (i) => utils.addJob("noop", { i }),
  addMany: (lo, hi) =>
    utils.withPgClient((client) =>
      client.query(
        `select ${schema}.add_jobs(array(select ('noop', p, null, null, null, null, null, null)::${schema}.job_spec from json_array_elements($1::json) p))`,
        [JSON.stringify(Array.from({ length: hi - lo }, (_, k) => ({ i: lo + k })))],
      ),
    ),
});
const submitted = process.hrtime.bigint();
await finished;
const ended = process.hrtime.bigint();
const seconds = Number(ended - started) / 1e9;
report({
  peer: "graphile-worker", mode: a.mode, jobs, workers, seconds,
  submit_seconds: Number(submitted - started) / 1e9, jobs_per_second: jobs / seconds,
});
await runner.stop();
await utils.withPgClient((client) => client.query(`drop schema ${schema} cascade`));
await utils.release();
