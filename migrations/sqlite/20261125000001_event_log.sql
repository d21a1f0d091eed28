-- One row per topic that has a log: its epoch (changes only when the log is
-- recreated) and the last offset assigned.
CREATE TABLE herald_topics (
    topic      TEXT    NOT NULL PRIMARY KEY,
    epoch      TEXT    NOT NULL,
    last_seq   INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);

-- The retained events. `seq` is the event's offset in its topic.
CREATE TABLE herald_events (
    topic     TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    ts        INTEGER NOT NULL,
    is_binary INTEGER NOT NULL,
    payload   BLOB    NOT NULL,
    idem_key  TEXT,
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;

CREATE UNIQUE INDEX herald_events_idem ON herald_events (topic, idem_key)
    WHERE idem_key IS NOT NULL;
