-- Pruning by age finds old events through this index, so its cost grows
-- with what it deletes, not with how many topics exist.
CREATE INDEX herald_events_ts ON herald_events (ts);
