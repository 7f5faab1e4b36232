-- Job counts by status and lane (GetQueueStats, the queue limit) without reading the jobs:
-- every statement that inserts, moves or deletes jobs adds its differences here, in its own
-- transaction; maintenance folds the rows into one per status and lane, and recounts from the
-- jobs now and then (one statement: the deletes and the count see the same snapshot).
CREATE TABLE job_counts (
    status smallint NOT NULL,
    lane smallint NOT NULL,
    n bigint NOT NULL
);

INSERT INTO job_counts (status, lane, n) SELECT status, lane, count(*) FROM jobs GROUP BY status, lane;
