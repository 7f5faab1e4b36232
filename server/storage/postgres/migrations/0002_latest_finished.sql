-- The latest good scan of an object and its policies (latest_finished): reuse by digest and
-- rematch read it at submit and for every stored SBOM.
CREATE INDEX jobs_finished_by_key ON jobs (dedup_key, finished_at DESC, seq DESC) WHERE status = 4;
