-- Each lane's queue as an index of its own, with exactly the claim's condition. The claim reads
-- a lane's PENDING jobs in arrival order; through jobs_pending (lane, seq) that path cost the
-- planner the same as walking jobs_seq_key or jobs_status and filtering, so statistics taken
-- while most rows were PENDING (a burst of submits, analyzed as it grows) could make the
-- cached plan walk the whole table in arrival order, stepping over every FINISHED job on each
-- claim until the next analyze. An index holding only the lane's PENDING jobs costs less than
-- either whatever the statistics say. jobs_pending stays for the statements that name the
-- lane as a parameter (positions, the oldest PENDING job per lane).
CREATE INDEX jobs_pending_bulk ON jobs (seq) WHERE status = 1 AND lane = 1;
CREATE INDEX jobs_pending_interactive ON jobs (seq) WHERE status = 1 AND lane = 2;
