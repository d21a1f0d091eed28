//! The durable event log.
//!
//! Every event of a topic with history is committed here before its publish
//! is acknowledged. The store assigns offsets: per topic, gap-free (1, 2, 3
//! …), under a row lock on the topic so concurrent publishers on any number
//! of nodes serialize. Each topic's log has an `epoch`: the database's
//! current `log_epoch` (table `herald_meta`; first the `store_id` drawn when
//! the database is first opened), fixed in the topic's row when its first
//! event is written and reported from the start for a topic with no row
//! yet. A fresh SQLite file or a new database gives new epochs, so offsets
//! from a lost log are never mistaken for current ones; so does pruning,
//! which draws a new `log_epoch` whenever it removes a topic's log entirely
//! (see [`retention`]), so a topic published to again starts a log that old
//! resume positions do not match. Resetting the log by hand means emptying
//! `herald_meta` along with the event tables (or dropping the database).
//!
//! Appends reach it through [`commit::GroupCommit`], which writes
//! publishes that arrive during a commit together in the next one.
//!
//! One SQL dialect serves both backends through sqlx's `Any` driver (`$N`
//! placeholders work in SQLite and PostgreSQL); only the migrations differ,
//! under `migrations/sqlite` and `migrations/postgres`. All SQL binds its
//! parameters.

pub mod commit;
pub mod heads;
pub mod retention;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::config::ConfigError;
use crate::event::Event;
use crate::payload::Payload;
use crate::topic::Topic;

/// Connections in the pool of one node.
const POOL_SIZE: u32 = 8;
/// A pooled connection idle for at least this long is checked with a ping
/// before it is used (a database restarted meanwhile costs no request);
/// a busier one is used at once, without that extra round trip.
const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);
/// Rows per `INSERT` of a batch (7 bound parameters each: well under
/// SQLite's and PostgreSQL's limits).
const INSERT_CHUNK: usize = 500;
/// Most events appended by one statement (see `Store::append_postgres`),
/// well inside PostgreSQL's 65,535 parameters; larger batches take a
/// transaction of chunked statements.
const ONE_STATEMENT_EVENTS: usize = 1000;
/// How many times an append is retried when it lost a race it can win on
/// a second try: a concurrent publish with the same idempotency key
/// committed first, or PostgreSQL chose it as a deadlock's victim.
const APPEND_RETRIES: usize = 3;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the event store is unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("a stored event of {topic} at offset {offset} cannot be read")]
    Corrupt { topic: Topic, offset: u64 },
    /// One failure answered to every request of a batch.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// The answer to a request made to one of the node's store tasks (the
    /// head reader, the committer, the pipeline) after it stopped.
    pub fn stopped() -> StoreError {
        StoreError::Unavailable(sqlx::Error::PoolClosed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a `store.url` names, if any.
    pub fn of_url(url: &SecretString) -> Option<Backend> {
        let url = url.expose_secret();
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// An event to append.
pub struct NewEvent {
    pub topic: Topic,
    pub payload: Payload,
    /// Idempotency key: a second append with the same key, by the same
    /// publisher, on the same topic returns the first one's offset and
    /// appends nothing.
    pub key: Option<IdempotencyKey>,
}

/// An idempotency key and whose it is: keys are scoped to (publisher,
/// topic, key), so one publisher cannot take another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The publishing token's `sub`.
    pub publisher: String,
    pub key: String,
}

/// How much one [`Store::read`] may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub events: u64,
    /// Payload bytes (as stored).
    pub bytes: usize,
}

/// Events read per query while replaying a resume to a subscriber.
const REPLAY_PAGE_EVENTS: u64 = 500;

impl Page {
    /// A page of a subscriber's replay (WebSocket or stream): 500 events,
    /// and at most `max_bytes` (`limits.max_page_bytes`); the next page is
    /// read once this one is written.
    pub fn replay(max_bytes: usize) -> Page {
        Page {
            events: REPLAY_PAGE_EVENTS,
            bytes: max_bytes,
        }
    }
}

/// A range of one topic's log, `(after, until]`, read a bounded page at a
/// time (see [`Store::range`]).
pub struct Range<'a> {
    store: &'a Store,
    topic: &'a Topic,
    /// The last offset read so far.
    after: u64,
    until: u64,
    page: Page,
}

impl Range<'_> {
    /// The next page of retained events, in offset order; `None` once the
    /// range is read (events pruned from it are skipped, not waited for).
    pub async fn next(&mut self) -> Result<Option<Vec<Event>>, StoreError> {
        if self.after >= self.until {
            return Ok(None);
        }
        let page = Page {
            events: (self.until - self.after).min(self.page.events),
            ..self.page
        };
        let mut events = self.store.read(self.topic, self.after, page).await?;
        let Some(newest) = events.last().map(|e| e.offset) else {
            // Nothing retained up to `until`: the rest was pruned.
            self.after = self.until;
            return Ok(None);
        };
        events.retain(|e| e.offset <= self.until);
        self.after = newest.min(self.until);
        Ok(Some(events))
    }

    /// Whether events of the range are left to read.
    pub fn more(&self) -> bool {
        self.after < self.until
    }
}

/// What an append did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub offset: u64,
    /// The idempotency key was seen before: nothing was appended.
    pub duplicate: bool,
}

/// A topic's log as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub epoch: String,
    /// The last offset assigned (0 when nothing was published yet).
    pub last: u64,
    /// The oldest retained offset, if any event is retained.
    pub oldest: Option<u64>,
}

/// What to replay for a client resuming at `since` in `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// Replay retained events with offsets above this, up to the head.
    pub after: Option<u64>,
    /// Some events the client asked for are gone (pruned, or the log was
    /// recreated since its epoch).
    pub truncated: bool,
}

impl Head {
    /// Plans a resume. `since` is trusted only within the current epoch
    /// (`since = 0` needs none: it means "from the start"); otherwise the
    /// replay starts at the oldest retained event and is reported truncated.
    pub fn plan_replay(&self, since: Option<u64>, epoch: Option<&str>) -> Replay {
        let Some(since) = since else {
            return Replay {
                after: None,
                truncated: false,
            };
        };
        let trusted = since == 0 || epoch == Some(self.epoch.as_str());
        let since = if trusted { since } else { 0 };
        // Events after `since` that should exist but are not retained.
        let first_missing = since.saturating_add(1);
        let lost = match self.oldest {
            Some(oldest) => oldest > first_missing,
            None => self.last >= first_missing,
        };
        Replay {
            after: Some(match self.oldest {
                Some(oldest) if lost => oldest - 1,
                _ => since,
            }),
            truncated: !trusted || lost,
        }
    }
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// The connection keyless appends on PostgreSQL run on, kept between
    /// them: sqlx pings a pooled connection each time it goes back to the
    /// pool, a round trip per commit. Taken out for each append and put
    /// back only once it succeeded, so a connection an error or a dropped
    /// append left mid-statement is closed, not reused. Checked like a
    /// pooled one after [`PING_IF_IDLE_FOR`] idle; with the time it was
    /// last used.
    appender: tokio::sync::Mutex<Option<(sqlx::AnyConnection, std::time::Instant)>>,
}

impl Store {
    /// Connects to `url` (`sqlite://…` or `postgres://…`) and applies the
    /// backend's migrations.
    pub async fn open(url: &SecretString) -> Result<Store, ConfigError> {
        let invalid =
            |reason: String| ConfigError::invalid("store.url", "HERALD__STORE__URL", reason);
        let backend = Backend::of_url(url)
            .ok_or_else(|| invalid("must start with sqlite:// or postgres://".into()))?;
        let url = url.expose_secret();
        sqlx::any::install_default_drivers();
        match backend {
            Backend::Sqlite => prepare_sqlite(url).await,
            Backend::Postgres => prepare_postgres(url).await,
        }
        .map_err(|e| invalid(format!("cannot prepare the database: {e}")))?;
        let pool = AnyPoolOptions::new()
            .max_connections(POOL_SIZE)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await
            .map_err(|e| invalid(format!("cannot connect: {e}")))?;
        let store = Store {
            pool,
            backend,
            appender: tokio::sync::Mutex::new(None),
        };
        store
            .migrate()
            .await
            .map_err(|e| invalid(format!("cannot apply migrations: {e}")))?;
        store
            .init_meta()
            .await
            .map_err(|e| invalid(format!("cannot read the store's id: {e}")))?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Draws the database's id and first log epoch (the same value), on
    /// whichever node opens it first.
    async fn init_meta(&self) -> Result<(), sqlx::Error> {
        let id = new_epoch();
        for name in ["store_id", "log_epoch"] {
            sqlx::query(
                "INSERT INTO herald_meta (name, value) VALUES ($1, \
                 COALESCE((SELECT value FROM herald_meta WHERE name = 'store_id'), $2)) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Applies any migration not applied yet; a no-op when up to date.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await,
        }
    }

    /// Appends events in order, in one transaction, and returns what
    /// happened to each. `ts` is the publish time of the new ones.
    pub async fn append(&self, events: &[NewEvent], ts: u64) -> Result<Vec<Appended>, StoreError> {
        let mut attempt = 0;
        loop {
            match self.try_append(events, ts).await {
                Err(StoreError::Unavailable(sqlx::Error::Database(e)))
                    if attempt < APPEND_RETRIES && lost_a_race(&*e) =>
                {
                    // Nothing of the attempt was committed; the next one
                    // finds the key that won, or the locks free.
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn try_append(&self, events: &[NewEvent], ts: u64) -> Result<Vec<Appended>, StoreError> {
        if self.backend == Backend::Postgres
            && events.len() <= ONE_STATEMENT_EVENTS
            && events.iter().all(|e| e.key.is_none())
        {
            return self.append_postgres(events, ts).await;
        }
        // The key lookups below read before the writes.
        let mut tx = self.begin_write().await?;
        // Idempotency first: an event whose key is already in the log (or
        // earlier in this batch) is a duplicate and takes no offset.
        let mut outcome: Vec<Option<Appended>> = vec![None; events.len()];
        let mut first_with_key: HashMap<(&str, &IdempotencyKey), usize> = HashMap::new();
        let mut alias: Vec<Option<usize>> = vec![None; events.len()];
        for (i, event) in events.iter().enumerate() {
            let Some(key) = &event.key else { continue };
            let topic = event.topic.as_str();
            if let Some(&first) = first_with_key.get(&(topic, key)) {
                alias[i] = Some(first);
                continue;
            }
            first_with_key.insert((topic, key), i);
            let existing = sqlx::query(
                "SELECT seq FROM herald_events WHERE topic = $1 AND idem_sub = $2 AND idem_key = $3",
            )
            .bind(topic)
            .bind(key.publisher.as_str())
            .bind(key.key.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                outcome[i] = Some(Appended {
                    offset: row.try_get::<i64, _>(0)? as u64,
                    duplicate: true,
                });
            }
        }
        // New events per topic, in the batch's order.
        let mut per_topic: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, event) in events.iter().enumerate() {
            if outcome[i].is_none() && alias[i].is_none() {
                per_topic.entry(event.topic.as_str()).or_default().push(i);
            }
        }
        // One row lock per topic, taken in topic order so that concurrent
        // batches over the same topics cannot deadlock, with one statement
        // per chunk of topics. The upsert creates a topic's log on its
        // first events and reserves their offsets.
        let topics: Vec<(&str, &Vec<usize>)> = per_topic.iter().map(|(t, i)| (*t, i)).collect();
        for chunk in topics.chunks(INSERT_CHUNK) {
            let mut query =
                sqlx::query(sqlx::AssertSqlSafe(reserve_offsets_sql(chunk.len()))).bind(ts as i64);
            for (topic, indexes) in chunk {
                query = query.bind(*topic).bind(indexes.len() as i64);
            }
            for row in query.fetch_all(&mut *tx).await? {
                assign_reserved(&row, &per_topic, &mut outcome)?;
            }
        }
        // The new events are exactly those given offsets above.
        let new: Vec<usize> = per_topic.into_values().flatten().collect();
        if new.iter().any(|&i| outcome[i].is_none()) {
            return Err(fewer_topics_reserved());
        }
        for chunk in new.chunks(INSERT_CHUNK) {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(insert_events_sql(chunk.len())));
            for &i in chunk {
                let event = &events[i];
                let offset = outcome[i].expect("assigned above").offset;
                let (is_binary, body) = stored_payload(&event.payload);
                query = query
                    .bind(event.topic.as_str())
                    .bind(offset as i64)
                    .bind(ts as i64)
                    .bind(is_binary)
                    .bind(body.to_vec())
                    .bind(event.key.as_ref().map(|k| k.publisher.clone()))
                    .bind(event.key.as_ref().map(|k| k.key.clone()));
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(outcome
            .iter()
            .zip(&alias)
            .map(|(own, alias)| match alias {
                Some(first) => Appended {
                    offset: outcome[*first].expect("assigned").offset,
                    duplicate: true,
                },
                None => own.expect("every event is a duplicate or assigned"),
            })
            .collect())
    }

    /// The common case, events without keys on PostgreSQL (a single
    /// publish, or a group of them): one statement, atomic on its own,
    /// instead of a transaction of four round trips. Each topic's offsets
    /// are reserved, one row lock per topic taken in topic order, and its
    /// events inserted, together.
    async fn append_postgres(
        &self,
        events: &[NewEvent],
        ts: u64,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut per_topic: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, event) in events.iter().enumerate() {
            per_topic.entry(event.topic.as_str()).or_default().push(i);
        }
        let shape = AppendShape::fitting(per_topic.len(), events.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(shape.sql())).bind(ts as i64);
        for (topic, indexes) in &per_topic {
            query = query.bind(*topic).bind(indexes.len() as i64);
        }
        for _ in per_topic.len()..shape.topics {
            query = query.bind(None::<String>).bind(0_i64);
        }
        // Each event as its distance back from its topic's new last offset.
        for (topic, indexes) in &per_topic {
            for (k, &i) in indexes.iter().enumerate() {
                let (is_binary, body) = stored_payload(&events[i].payload);
                query = query
                    .bind(*topic)
                    .bind((indexes.len() - 1 - k) as i64)
                    .bind(is_binary)
                    .bind(body.to_vec());
            }
        }
        for _ in events.len()..shape.events {
            query = query
                .bind(None::<String>)
                .bind(0_i64)
                .bind(0_i64)
                .bind(Vec::<u8>::new());
        }
        let mut appender = self.appender.lock().await;
        let mut conn = self.appender_connection(appender.take()).await?;
        let rows = query.fetch_all(&mut conn).await?;
        *appender = Some((conn, std::time::Instant::now()));
        drop(appender);
        let mut appended = vec![None; events.len()];
        for row in &rows {
            let inserted: i64 = row.try_get(2)?;
            if inserted != events.len() as i64 {
                return Err(store_bug(format!(
                    "appending {} events inserted {inserted}",
                    events.len()
                )));
            }
            assign_reserved(row, &per_topic, &mut appended)?;
        }
        appended
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(fewer_topics_reserved)
    }

    /// The connection for the next keyless append: the one kept from the
    /// last, pinged first if it sat idle for [`PING_IF_IDLE_FOR`], or else
    /// one taken out of the pool for good (the pool may open another).
    async fn appender_connection(
        &self,
        kept: Option<(sqlx::AnyConnection, std::time::Instant)>,
    ) -> Result<sqlx::AnyConnection, sqlx::Error> {
        if let Some((mut conn, used)) = kept
            && (used.elapsed() < PING_IF_IDLE_FOR
                || sqlx::Connection::ping(&mut conn).await.is_ok())
        {
            return Ok(conn);
        }
        Ok(self.pool.acquire().await?.detach())
    }

    /// The topic's epoch, last offset and oldest retained offset. A topic
    /// never published to has no log row yet: its head is empty, in the
    /// epoch its log will have. Read-only, so subscribing writes nothing.
    pub async fn head(&self, topic: &Topic) -> Result<Head, StoreError> {
        let mut heads = self.heads(&[topic]).await?;
        Ok(heads.pop().expect("one head per topic"))
    }

    /// The heads of `topics`, in their order (see [`head`](Self::head)),
    /// in one query per [`INSERT_CHUNK`] distinct topics rather than one
    /// each; a topic named twice is read once.
    pub async fn heads(&self, topics: &[&Topic]) -> Result<Vec<Head>, StoreError> {
        let mut distinct = topics.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut found = HashMap::with_capacity(distinct.len());
        let mut new_log_epoch = String::new();
        for chunk in distinct.chunks(INSERT_CHUNK) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            // The last row is the epoch a topic without a log would get.
            let sql = format!(
                "SELECT t.topic, t.epoch, t.last_seq, \
                 (SELECT MIN(e.seq) FROM herald_events e WHERE e.topic = t.topic) \
                 FROM herald_topics t WHERE t.topic IN ({}) \
                 UNION ALL SELECT NULL, value, 0, NULL FROM herald_meta WHERE name = 'log_epoch'",
                placeholders.join(", ")
            );
            // Only numbered placeholders: every topic is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for topic in chunk {
                query = query.bind(topic.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                if row.try_get::<Option<String>, _>(0)?.is_none() {
                    new_log_epoch = row.try_get(1)?;
                    continue;
                }
                let head = Head {
                    epoch: row.try_get(1)?,
                    last: row.try_get::<i64, _>(2)? as u64,
                    oldest: row.try_get::<Option<i64>, _>(3)?.map(|o| o as u64),
                };
                found.insert(row.try_get::<String, _>(0)?, head);
            }
        }
        Ok(topics
            .iter()
            .map(|t| {
                found.get(t.as_str()).cloned().unwrap_or_else(|| Head {
                    epoch: new_log_epoch.clone(),
                    last: 0,
                    oldest: None,
                })
            })
            .collect())
    }

    /// Retained events of `topic` with offsets above `after`, in offset
    /// order: up to `page.events` of them, and no more payload bytes than
    /// `page.bytes` (but always the first, whatever its size). The byte
    /// bound is applied by the database (a running sum), so rows past it
    /// are never sent, and a page never holds more than its bound.
    pub async fn read(
        &self,
        topic: &Topic,
        after: u64,
        page: Page,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, ts, is_binary, payload FROM ( \
                 SELECT seq, ts, is_binary, payload, LENGTH(payload) AS size, \
                        SUM(LENGTH(payload)) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto \
                 FROM herald_events WHERE topic = $1 AND seq > $2 ORDER BY seq LIMIT $3 \
             ) page WHERE upto <= $4 OR upto = size ORDER BY seq",
        )
        .bind(topic.as_str())
        .bind(after as i64)
        .bind(clamp(page.events))
        .bind(clamp(page.bytes as u64))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| decode_event(topic, row)).collect()
    }

    /// The retained events of `topic` in `(after, until]`, read page by
    /// page: the one way replay, history and gap-fill read the log.
    pub fn range<'a>(&'a self, topic: &'a Topic, after: u64, until: u64, page: Page) -> Range<'a> {
        Range {
            store: self,
            topic,
            after,
            until,
            page,
        }
    }

    /// How many events of `topic` are retained.
    pub async fn retained(&self, topic: &Topic) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM herald_events WHERE topic = $1")
            .bind(topic.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // The pruning statements below are planned at each run, not once per
    // pooled connection (`persistent(false)`): a plan PostgreSQL made while
    // the tables were empty (a nested loop) would stay with the connection
    // and turn a pass over thousands of topics quadratic.

    /// Topics with an event published before `before_ms` (through the
    /// `ts` index: as many rows as there are such events, at most).
    pub async fn topics_with_events_before(
        &self,
        before_ms: u64,
    ) -> Result<Vec<Topic>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT topic FROM herald_events WHERE ts < $1")
            .persistent(false)
            .bind(clamp(before_ms))
            .fetch_all(&self.pool)
            .await?;
        Ok(topics_of(&rows))
    }

    /// Deletes the events of `topics` published before `before_ms`, in
    /// statements of [`INSERT_CHUNK`] topics; returns how many went.
    pub async fn delete_before(
        &self,
        topics: &[&Topic],
        before_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for chunk in topics.chunks(INSERT_CHUNK) {
            let placeholders: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
            let sql = format!(
                "DELETE FROM herald_events WHERE ts < $1 AND topic IN ({})",
                placeholders.join(", ")
            );
            // Only numbered placeholders: every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .persistent(false)
                .bind(clamp(before_ms));
            for topic in chunk {
                query = query.bind(topic.as_str());
            }
            deleted += query.execute(&self.pool).await?.rows_affected();
        }
        Ok(deleted)
    }

    /// Topics that retain an event at least `keep` below their last offset
    /// (so more than `keep` events), with their last offset: one index
    /// probe per topic that has a log.
    pub async fn topics_over(&self, keep: u64) -> Result<Vec<(Topic, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.topic, t.last_seq FROM herald_topics t WHERE EXISTS \
             (SELECT 1 FROM herald_events e WHERE e.topic = t.topic AND e.seq <= t.last_seq - $1)",
        )
        .persistent(false)
        .bind(clamp(keep))
        .fetch_all(&self.pool)
        .await?;
        topics_with_offsets(&rows)
    }

    /// Deletes each topic's events at or below its offset, in statements
    /// of [`INSERT_CHUNK`] topics; returns how many went.
    pub async fn delete_through(&self, upto: &[(&Topic, u64)]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for chunk in upto.chunks(INSERT_CHUNK) {
            let terms: Vec<String> = (0..chunk.len())
                .map(|i| format!("(topic = ${} AND seq <= ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            let sql = format!("DELETE FROM herald_events WHERE {}", terms.join(" OR "));
            // Only numbered placeholders: every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false);
            for (topic, offset) in chunk {
                query = query.bind(topic.as_str()).bind(clamp(*offset));
            }
            deleted += query.execute(&self.pool).await?.rows_affected();
        }
        Ok(deleted)
    }

    /// Topics whose log retains no event, with their last offset.
    pub async fn empty_topics(&self) -> Result<Vec<(Topic, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.topic, t.last_seq FROM herald_topics t WHERE NOT EXISTS \
             (SELECT 1 FROM herald_events e WHERE e.topic = t.topic)",
        )
        .persistent(false)
        .fetch_all(&self.pool)
        .await?;
        topics_with_offsets(&rows)
    }

    /// Removes the logs of `topics` (found empty at these last offsets)
    /// entirely, those still empty and not published to since, and draws a
    /// new log epoch if any went: a topic published to again starts a log
    /// that no earlier resume position matches. Returns how many went.
    pub async fn remove_topics(&self, topics: &[(&Topic, u64)]) -> Result<u64, StoreError> {
        if topics.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut removed = 0;
        for chunk in topics.chunks(INSERT_CHUNK) {
            // A publish since the topic was found empty moved its last
            // offset (and holds its row until it commits): such a topic
            // stays.
            let terms: Vec<String> = (0..chunk.len())
                .map(|i| format!("(topic = ${} AND last_seq = ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            let sql = format!(
                "DELETE FROM herald_topics WHERE ({}) AND NOT EXISTS \
                 (SELECT 1 FROM herald_events e WHERE e.topic = herald_topics.topic)",
                terms.join(" OR ")
            );
            // Only numbered placeholders: every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false);
            for (topic, last) in chunk {
                query = query.bind(topic.as_str()).bind(clamp(*last));
            }
            removed += query.execute(&mut *tx).await?.rows_affected();
        }
        if removed > 0 {
            sqlx::query("UPDATE herald_meta SET value = $1 WHERE name = 'log_epoch'")
                .bind(new_epoch())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// A transaction that will write. SQLite takes its write lock up
    /// front: one that reads and then writes fails at once
    /// (SQLITE_BUSY_SNAPSHOT) when another writer got in between.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }
}

/// Gives the new events of the topic in `row` (its name and its new last
/// offset, as reserving returns them) their offsets: in order, ending at
/// that last offset.
fn assign_reserved(
    row: &AnyRow,
    per_topic: &BTreeMap<&str, Vec<usize>>,
    outcome: &mut [Option<Appended>],
) -> Result<(), StoreError> {
    let topic: String = row.try_get(0)?;
    let last: i64 = row.try_get(1)?;
    let indexes = per_topic
        .get(topic.as_str())
        .ok_or_else(|| store_bug("reserving offsets returned a topic not asked for"))?;
    let n = indexes.len() as i64;
    for (k, &i) in indexes.iter().enumerate() {
        outcome[i] = Some(Appended {
            offset: (last - n + 1 + k as i64) as u64,
            duplicate: false,
        });
    }
    Ok(())
}

/// Every topic's row is returned when its offsets are reserved: anything
/// else is a bug, not a publish to acknowledge.
fn fewer_topics_reserved() -> StoreError {
    store_bug("reserving offsets returned fewer topics than asked")
}

/// An answer from the database that the statement cannot give.
fn store_bug(message: impl Into<String>) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Protocol(message.into()))
}

/// Whether an append failed only because a concurrent transaction got in
/// its way: the same idempotency key committed first (unique violation),
/// or a deadlock (`40P01`, e.g. with a pruning pass removing topics) or
/// serialization failure (`40001`) aborted it.
fn lost_a_race(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.is_unique_violation() || matches!(error.code().as_deref(), Some("40P01" | "40001"))
}

/// A value for a BIGINT column (offsets and times fit in 63 bits).
fn clamp(value: u64) -> i64 {
    value.min(i64::MAX as u64) as i64
}

/// The topics in the first column of `rows`; anything not a valid topic
/// (never written) is skipped.
fn topics_of(rows: &[AnyRow]) -> Vec<Topic> {
    rows.iter()
        .filter_map(|row| row.try_get::<String, _>(0).ok())
        .filter_map(|name| Topic::parse(&name).ok())
        .collect()
}

/// `(topic, last_seq)` rows.
fn topics_with_offsets(rows: &[AnyRow]) -> Result<Vec<(Topic, u64)>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get(0)?;
        if let Ok(topic) = Topic::parse(&name) {
            out.push((topic, row.try_get::<i64, _>(1)? as u64));
        }
    }
    Ok(out)
}

/// A payload as stored: `is_binary` (0 for JSON text, 1 for bytes) and the
/// bytes. [`decode_event`] reads it back.
fn stored_payload(payload: &Payload) -> (i64, &[u8]) {
    match payload {
        Payload::Json(raw) => (0, raw.get().as_bytes()),
        Payload::Binary(bytes) => (1, bytes),
    }
}

fn decode_event(topic: &Topic, row: &AnyRow) -> Result<Event, StoreError> {
    let offset = row.try_get::<i64, _>(0)? as u64;
    let ts = row.try_get::<i64, _>(1)? as u64;
    let is_binary: i64 = row.try_get(2)?;
    let body: Vec<u8> = row.try_get(3)?;
    let payload = if is_binary == 0 {
        let text = String::from_utf8(body).map_err(|_| StoreError::Corrupt {
            topic: topic.clone(),
            offset,
        })?;
        Payload::Json(
            RawValue::from_string(text).map_err(|_| StoreError::Corrupt {
                topic: topic.clone(),
                offset,
            })?,
        )
    } else {
        Payload::Binary(Bytes::from(body))
    };
    Ok(Event::new(topic.clone(), offset, ts, payload))
}

/// `INSERT … ON CONFLICT` reserving offsets for `rows` topics: `$1` is
/// the publish time, then each topic and its number of new events; returns
/// each topic with its new last offset. The rows come from a `VALUES` list
/// so that the epoch is read once per statement, not once per row (a
/// third of a 64-topic group's time in PostgreSQL); `WHERE true` settles
/// SQLite's parse of `SELECT … ON CONFLICT`.
fn reserve_offsets_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| format!("(${}, ${})", 2 * r + 2, 2 * r + 3))
        .collect();
    format!(
        "INSERT INTO herald_topics (topic, epoch, last_seq, created_ms) \
         SELECT column1, (SELECT value FROM herald_meta WHERE name = 'log_epoch'), column2, $1 \
         FROM (VALUES {}) AS v WHERE true \
         ON CONFLICT (topic) DO UPDATE SET last_seq = herald_topics.last_seq + excluded.last_seq \
         RETURNING topic, last_seq",
        values.join(", ")
    )
}

/// The shape of [`Store::append_postgres`]'s statement: its lists of
/// topics and of events, each padded to a power of two with rows that
/// match nothing, so that a few statements stay prepared whatever the
/// sizes of the groups.
struct AppendShape {
    topics: usize,
    events: usize,
}

impl AppendShape {
    fn fitting(topics: usize, events: usize) -> AppendShape {
        AppendShape {
            topics: topics.next_power_of_two(),
            events: events.next_power_of_two(),
        }
    }

    /// `$1` is the publish time; then topic and event count per topic;
    /// then topic, distance back from the topic's last offset, binary flag
    /// and payload per event. Only numbered placeholders: every value is
    /// bound.
    fn sql(&self) -> String {
        let topics: Vec<String> = (0..self.topics)
            .map(|r| format!("(${}, ${})", 2 * r + 2, 2 * r + 3))
            .collect();
        let first = 2 * self.topics + 2;
        let events: Vec<String> = (0..self.events)
            .map(|r| {
                let p = first + 4 * r;
                format!("(${}, ${}, ${}, ${})", p, p + 1, p + 2, p + 3)
            })
            .collect();
        format!(
            "WITH v (topic, n) AS (VALUES {}), \
             t AS ( \
                 INSERT INTO herald_topics (topic, epoch, last_seq, created_ms) \
                 SELECT topic, (SELECT value FROM herald_meta WHERE name = 'log_epoch'), n, $1 \
                 FROM v WHERE topic IS NOT NULL \
                 ON CONFLICT (topic) DO UPDATE SET last_seq = herald_topics.last_seq + excluded.last_seq \
                 RETURNING topic, last_seq), \
             e (topic, back, is_binary, payload) AS (VALUES {}), \
             i AS ( \
                 INSERT INTO herald_events (topic, seq, ts, is_binary, payload) \
                 SELECT e.topic, t.last_seq - e.back, $1, e.is_binary, e.payload \
                 FROM e JOIN t ON t.topic = e.topic \
                 RETURNING 1) \
             SELECT topic, last_seq, (SELECT count(*) FROM i) FROM t",
            topics.join(", "),
            events.join(", ")
        )
    }
}

/// `INSERT INTO herald_events ... VALUES ($1, ..., $7), ...` for `rows`
/// rows: only numbered placeholders, every value is bound.
fn insert_events_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO herald_events (topic, seq, ts, is_binary, payload, idem_sub, idem_key) VALUES ",
    );
    for row in 0..rows {
        let p = row * 7;
        if row > 0 {
            sql.push_str(", ");
        }
        let placeholders: Vec<String> = (1..=7).map(|k| format!("${}", p + k)).collect();
        sql.push_str(&format!("({})", placeholders.join(", ")));
    }
    sql
}

/// A fresh epoch: 128 random bits, hex.
fn new_epoch() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates the PostgreSQL database if it does not exist yet.
async fn prepare_postgres(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::migrate::MigrateDatabase;
    if sqlx::Postgres::database_exists(url).await? {
        return Ok(());
    }
    match sqlx::Postgres::create_database(url).await {
        Ok(()) => {
            tracing::info!("created the event store database");
            Ok(())
        }
        // Nodes starting together race to create it; one winner is enough.
        Err(_) if sqlx::Postgres::database_exists(url).await? => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the SQLite file (mode 0600) and its folder (0700) if missing and
/// turns on WAL, so that readers do not block the writer.
async fn prepare_sqlite(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let file = options.get_filename();
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    if let Some(dir) = file.parent().filter(|d| !in_memory && d != &Path::new("")) {
        crate::files::create_private_dir_all(dir).map_err(sqlx::Error::Io)?;
    }
    // Created here, private, before SQLite creates it: the file holds
    // every payload, and SQLite gives its WAL files the same mode.
    if !in_memory {
        match crate::files::create_private_file(file) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(sqlx::Error::Io(e)),
        }
    }
    let conn = options.connect().await?;
    sqlx::Connection::close(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(last: u64, oldest: Option<u64>) -> Head {
        Head {
            epoch: "e1".into(),
            last,
            oldest,
        }
    }

    #[test]
    fn replay_plans() {
        let h = head(10, Some(4));
        assert_eq!(
            h.plan_replay(None, None),
            Replay {
                after: None,
                truncated: false
            }
        );
        // Within the epoch and retained: exactly what was missed.
        assert_eq!(
            h.plan_replay(Some(5), Some("e1")),
            Replay {
                after: Some(5),
                truncated: false
            }
        );
        assert_eq!(
            h.plan_replay(Some(3), Some("e1")),
            Replay {
                after: Some(3),
                truncated: false
            }
        );
        // Pruned past the client's position: from the oldest, truncated.
        assert_eq!(
            h.plan_replay(Some(1), Some("e1")),
            Replay {
                after: Some(3),
                truncated: true
            }
        );
        // Another epoch (or none) is never trusted.
        assert_eq!(
            h.plan_replay(Some(7), Some("e0")),
            Replay {
                after: Some(3),
                truncated: true
            }
        );
        assert_eq!(
            h.plan_replay(Some(7), None),
            Replay {
                after: Some(3),
                truncated: true
            }
        );
        // From the start: no epoch needed.
        assert_eq!(
            h.plan_replay(Some(0), None),
            Replay {
                after: Some(3),
                truncated: true
            }
        );
        assert_eq!(
            head(3, Some(1)).plan_replay(Some(0), None),
            Replay {
                after: Some(0),
                truncated: false
            }
        );
        // Up to date, and an empty log.
        assert_eq!(
            h.plan_replay(Some(10), Some("e1")),
            Replay {
                after: Some(10),
                truncated: false
            }
        );
        assert_eq!(
            head(0, None).plan_replay(Some(0), None),
            Replay {
                after: Some(0),
                truncated: false
            }
        );
        // Everything pruned.
        assert_eq!(
            head(5, None).plan_replay(Some(2), Some("e1")),
            Replay {
                after: Some(2),
                truncated: true
            }
        );
    }
}
