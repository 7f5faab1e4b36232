-- A change made by a replica with no receiving server is owed to no one (its row's deliverer
-- is NULL, or whoever made the change before): such rows stay out of jobs_owing, which
-- otherwise took an entry for every version of every job when no receiver is configured.
DROP INDEX jobs_owing;
CREATE INDEX jobs_owing ON jobs (deliverer)
    WHERE deliverer IS NOT NULL
    AND (delivered < jsonb_array_length(history) OR verdict_delivered < verdict_version);
