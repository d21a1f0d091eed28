-- Idempotency keys belong to their publisher: unique per (topic, publisher
-- sub, key), so one publisher cannot claim another's key. Keys stored
-- before this migration have no publisher and match no later publish.
ALTER TABLE herald_events ADD COLUMN idem_sub TEXT;
DROP INDEX herald_events_idem;
CREATE UNIQUE INDEX herald_events_idem ON herald_events (topic, idem_sub, idem_key)
    WHERE idem_key IS NOT NULL;
