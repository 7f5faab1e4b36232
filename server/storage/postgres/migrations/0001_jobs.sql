-- The job tables. Applied in the schema named by --database-schema (the search_path), under
-- pg_advisory_lock, in one transaction with its row in schema_migrations.

CREATE TABLE jobs (
    id text PRIMARY KEY,
    -- Arrival order: one sequence for every replica; a retried job keeps its seq.
    seq bigint NOT NULL UNIQUE,
    lane smallint NOT NULL,
    kind smallint NOT NULL,
    trigger smallint NOT NULL,
    status smallint NOT NULL,
    runs integer NOT NULL DEFAULT 0,
    scanner_id text NOT NULL DEFAULT '',
    -- The replica that holds the run (IN_PROGRESS, PROCESSING_RESULTS) and until when.
    replica text,
    lease_until timestamptz,
    -- Bumped by every write: the compare-and-set of a move.
    version integer NOT NULL DEFAULT 0,
    dedup_key text NOT NULL,
    idempotency_key text NOT NULL DEFAULT '',
    -- The job as submitted (imagehandler.storage.v1.StoredJob, without history).
    spec bytea NOT NULL,
    error jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    -- [[from, to, at (unix micros), scanner, run, reason, [code, message, detail] | null], ...]
    history jsonb NOT NULL,
    -- The result kept with its move when small (imagehandler.v1.ScanResult); a large one is
    -- in results.
    result bytea,
    summary bytea,
    result_in_file boolean NOT NULL DEFAULT false,
    delivered integer NOT NULL DEFAULT 0,
    verdict_version integer NOT NULL DEFAULT 0,
    verdict_delivered integer NOT NULL DEFAULT 0
);

CREATE SEQUENCE jobs_arrival;

-- The queue: PENDING jobs per lane in arrival order (the claim reads it with SKIP LOCKED).
CREATE INDEX jobs_pending ON jobs (lane, seq) WHERE status = 1;
-- Runs held by a replica: lease renewal and the rescue of expired leases.
CREATE INDEX jobs_running ON jobs (lease_until) WHERE status IN (2, 3);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE status IN (4, 5, 6);
-- Deduplication across replicas: one active job (PENDING or IN_PROGRESS) per object and
-- policies, one job per idempotency key.
CREATE UNIQUE INDEX jobs_active_object ON jobs (dedup_key) WHERE status IN (1, 2);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key) WHERE idempotency_key <> '';

CREATE TABLE results (
    job_id text PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    payload bytea NOT NULL
);

CREATE TABLE acceptances (
    id text PRIMARY KEY,
    n bigserial NOT NULL,
    -- imagehandler.v1.RiskAcceptance
    body bytea NOT NULL
);
