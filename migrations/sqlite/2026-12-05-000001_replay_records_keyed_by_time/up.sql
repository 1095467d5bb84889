-- SQLite's replay table has been keyed by signed time since 2026-12-04
-- (…_replay_records_by_time); this migration re-keys PostgreSQL's the same way and has
-- nothing to do here. Both backends keep the same list of migrations.
SELECT 1;
