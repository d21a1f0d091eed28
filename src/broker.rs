//! The routing interface the WebSocket and HTTP layers talk to.
//!
//! [`Broker`] ties together the local [`Hub`] (who on this node wants which
//! topic), the [`Store`] (the durable log of topics with history) and the
//! [`Relay`] (how events reach every node). Callers never see which relay
//! or store runs: single node or cluster, SQLite or PostgreSQL, the
//! WebSocket and HTTP code is the same.
//!
//! A publish to a topic with history is acknowledged only after its commit;
//! then it is broadcast. A publish to a topic without history is relayed
//! live only.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::event::{Event, now_ms};
use crate::hub::{ConnId, Hub, Mailbox};
use crate::payload::Payload;
pub use crate::relay::PublishError;
use crate::relay::{Relay, Shared};
use crate::store::heads::HeadReader;
use crate::store::retention::{Retention, Watchers, run_pruner};
use crate::store::{Backend, Head, NewEvent, Store, StoreError};
use crate::telemetry::names;
use crate::topic::Topic;

/// How a publish reached this node (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    WebSocket,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::WebSocket => "ws",
        }
    }
}

pub struct Broker {
    hub: Arc<Hub>,
    /// Shared with the pruner, which asks it who watches a topic.
    relay: Arc<Relay>,
    store: Arc<Store>,
    retention: Arc<Retention>,
    /// Reads subscribes' heads, many per query.
    heads: HeadReader,
    /// The pruner and the head reader.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Broker {
    /// Opens the store (applying migrations), starts the relay, the pruner
    /// and the head reader; every background task stops when `shutdown` is
    /// cancelled.
    pub async fn new(
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> Result<Broker, ConfigError> {
        // Checked before the store opens, which would create the file.
        if settings.redis.url.is_some()
            && Backend::of_url(&settings.store.url) == Some(Backend::Sqlite)
        {
            return Err(ConfigError::invalid(
                "store.url",
                "HERALD__STORE__URL",
                "a cluster (redis.url set) needs a shared store: set store.url to postgres://…; \
                 with a SQLite file per node, nodes would assign conflicting offsets",
            ));
        }
        let store = Arc::new(Store::open(&settings.store.url).await?);
        let retention = Arc::new(Retention::from_settings(settings)?);
        let hub = Arc::new(Hub::default());
        let shared = Shared {
            hub: Arc::clone(&hub),
            store: Arc::clone(&store),
            retention: Arc::clone(&retention),
        };
        let relay = Arc::new(Relay::from_settings(settings, shared, shutdown.clone())?);
        let pruner = tokio::spawn(run_pruner(
            Arc::clone(&store),
            Arc::clone(&retention),
            Arc::clone(&relay) as Arc<dyn Watchers>,
            shutdown.clone(),
        ));
        let (heads, head_reader) = HeadReader::spawn(Arc::clone(&store), shutdown);
        Ok(Broker {
            hub,
            relay,
            store,
            retention,
            heads,
            tasks: Mutex::new(vec![pruner, head_reader]),
        })
    }

    /// Publishes events in order; returns their offsets in the same order.
    /// An event whose idempotency key was seen before gets its first
    /// offset back and is not published again.
    pub async fn publish(
        &self,
        events: Vec<NewEvent>,
        transport: Transport,
    ) -> Result<Vec<u64>, PublishError> {
        let count = events.len() as u64;
        let offsets = self.publish_events(events).await?;
        metrics::counter!(names::PUBLISHED, "transport" => transport.label()).increment(count);
        Ok(offsets)
    }

    async fn publish_events(&self, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        if !self.relay.is_ready() {
            return Err(PublishError::Unavailable(
                "the relay (Redis) is not connected; retry".into(),
            ));
        }
        let ts = now_ms();
        let (durable, live): (Vec<_>, Vec<_>) = events
            .into_iter()
            .enumerate()
            .partition(|(_, e)| self.retention.history(&e.topic));
        let mut offsets = vec![0; durable.len() + live.len()];

        if !durable.is_empty() {
            let (slots, events): (Vec<usize>, Vec<NewEvent>) = durable.into_iter().unzip();
            let started = Instant::now();
            let appended = self.store.append(&events, ts).await;
            metrics::histogram!(names::STORE_COMMIT).record(started.elapsed().as_secs_f64());
            let appended = appended.map_err(|e| {
                tracing::warn!(error = %e, "publish not committed");
                PublishError::Unavailable("the event store is unavailable; retry".into())
            })?;
            let mut fresh = Vec::new();
            for ((slot, event), done) in slots.into_iter().zip(events).zip(appended) {
                offsets[slot] = done.offset;
                if !done.duplicate {
                    fresh.push(Arc::new(Event::new(
                        event.topic,
                        done.offset,
                        ts,
                        event.payload,
                    )));
                }
            }
            self.relay.broadcast(fresh).await;
        }
        if !live.is_empty() {
            let (slots, events): (Vec<usize>, Vec<(Topic, Payload)>) = live
                .into_iter()
                .map(|(slot, e)| (slot, (e.topic, e.payload)))
                .unzip();
            let assigned = self.relay.publish_ephemeral(events, ts).await?;
            for (slot, offset) in slots.into_iter().zip(assigned) {
                offsets[slot] = offset;
            }
        }
        Ok(offsets)
    }

    /// Starts delivering `topic`'s events to `mailbox`. Returns once events
    /// published from now on will reach it, with the topic's head when it
    /// keeps history.
    pub async fn subscribe(
        &self,
        topic: &Topic,
        mailbox: &Mailbox,
    ) -> Result<Option<Head>, StoreError> {
        self.hub.subscribe(topic, mailbox);
        // Not only for the topic's first local subscriber: a second one
        // must also wait until the first one's Redis subscription is
        // confirmed. The relay applies changes in order and skips no-ops.
        self.relay.interest_changed(topic).await;
        if self.retention.history(topic) {
            Ok(Some(self.heads.head(topic).await?))
        } else {
            Ok(None)
        }
    }

    /// Stops delivering `topic`'s events to connection `id`.
    pub async fn unsubscribe(&self, topic: &Topic, id: ConnId) {
        if self.hub.unsubscribe(topic, id) {
            self.relay.interest_changed(topic).await;
        }
    }

    /// [`unsubscribe`](Self::unsubscribe) for a connection whose task is
    /// ending in a way that cannot wait (its drop guard): the hub at once,
    /// the relay told without waiting for its confirmation.
    pub fn release(&self, topic: &Topic, id: ConnId) {
        if self.hub.unsubscribe(topic, id) {
            self.relay.interest_dropped(topic);
        }
    }

    /// How many connections on this node subscribe to `topic`.
    pub fn local_subscribers(&self, topic: &Topic) -> usize {
        self.hub.subscriber_count(topic)
    }

    /// `local` (single node), `connected` or `disconnected` (Redis).
    pub fn relay_state(&self) -> &'static str {
        match (self.relay.as_ref(), self.relay.is_ready()) {
            (Relay::Local(_), _) => "local",
            (Relay::Redis(_), true) => "connected",
            (Relay::Redis(_), false) => "disconnected",
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Whether this node can publish and receive events right now.
    pub fn is_ready(&self) -> bool {
        self.relay.is_ready()
    }

    /// Waits for background work to finish once shutdown was requested.
    pub async fn stopped(&self) {
        self.relay.stopped().await;
        for task in self.tasks.lock().await.drain(..) {
            let _ = task.await;
        }
    }
}
