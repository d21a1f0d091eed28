-- Facts about this event store. `store_id` is drawn once, when the store is
-- first opened: it is the epoch of every topic log created in this database,
-- so a log that is lost with its database (or recreated elsewhere) gets a
-- new epoch, while subscribing to a topic that has no log yet needs no write.
CREATE TABLE herald_meta (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
