-- Deliveries a dead replica owed (issue 16): every change of a job records the replica that
-- made it, whose outbox now owes the receiving server that change; each replica renews its
-- row in replicas every third of a lease. A job whose deliveries lag its history and whose
-- deliverer is past alive_until (or unknown) is adopted by a live replica.
ALTER TABLE jobs ADD COLUMN deliverer text;

CREATE TABLE replicas (
    id text PRIMARY KEY,
    alive_until timestamptz NOT NULL
);

-- Only the jobs that still owe something (all of them when no receiver is configured).
CREATE INDEX jobs_owing ON jobs (deliverer)
    WHERE delivered < jsonb_array_length(history) OR verdict_delivered < verdict_version;
