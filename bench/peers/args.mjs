// Shared argument parsing and the one JSON line every peer prints for bench/peers.py.
export function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    out[key] = argv[i + 1];
  }
  return out;
}

// Submit `jobs` no-op jobs: batched (sequences of `batch` per call, `inflight` calls at once) or
// single (one job per call, `inflight` calls at once), the same shapes as bench/e2e.py.
export async function submitAll({ jobs, mode, batch, inflight, addOne, addMany }) {
  let next = 0;
  async function worker() {
    for (;;) {
      if (mode === "batched") {
        const start = next;
        if (start >= jobs) return;
        next = Math.min(jobs, start + batch);
        await addMany(start, next);
      } else {
        const i = next++;
        if (i >= jobs) return;
        await addOne(i);
      }
    }
  }
  await Promise.all(Array.from({ length: inflight }, worker));
}

export function report(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}
