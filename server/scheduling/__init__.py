"""Matching jobs to scanners in memory: the FIFO queue per lane and kind, the ring of Free
scanners, and run deadlines in time buckets."""
