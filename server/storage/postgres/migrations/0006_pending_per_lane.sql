-- Each lane's queue as an index of its own, with exactly the condition of the statements that
-- read it (the claim, the queue's counts, positions), which name the lane as a constant.
-- Through jobs_pending (lane, seq) such a read cost the planner the same as walking
-- jobs_seq_key or jobs_status in arrival order and filtering, so statistics taken while most
-- rows were PENDING (a burst of submits, analyzed as it grows) could leave cached plans that
-- step over every FINISHED job on each claim until the next analyze. An index holding only
-- the lane's PENDING jobs costs less than either whatever the statistics say.
CREATE INDEX jobs_pending_bulk ON jobs (seq) WHERE status = 1 AND lane = 1;
CREATE INDEX jobs_pending_interactive ON jobs (seq) WHERE status = 1 AND lane = 2;
DROP INDEX jobs_pending;
