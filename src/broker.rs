//! The node's core, which the WebSocket and HTTP layers talk to.
//!
//! [`Broker`] ties together the [`Store`] (the durable log of topics with
//! history), the [`Relay`] (how events reach every node) and the
//! [`Pipeline`] (how they reach this node's subscribers). Callers never
//! see which relay or store runs: single node or cluster, SQLite or
//! PostgreSQL, the WebSocket and HTTP code is the same.
//!
//! A publish to a topic with history is acknowledged only after its commit;
//! then it is relayed. A publish to a topic without history is relayed
//! live only, numbered by the relay.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::event::{Event, now_ms};
use crate::mailbox::{ConnId, Mailbox};
use crate::payload::Payload;
use crate::pipeline::Pipeline;
use crate::presence::{self, Presence};
use crate::relay::{self, Inbound, Relay, RelayError, RelayState};
use crate::store::commit::{GroupCommit, Orphans};
use crate::store::retention::{Retention, run_pruner};
use crate::store::{Backend, Head, NewEvent, Store, StoreError};
use crate::telemetry::names;
use crate::topic::Topic;

/// Why a publish was not accepted. Nothing was published when this is
/// returned.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The relay is not connected (also what `/readyz` reports).
    #[error("publishing is unavailable: the relay (Redis) is not connected; retry")]
    NotReady,
    #[error("publishing is unavailable: the event store is unavailable; retry")]
    Store(#[source] StoreError),
    #[error("publishing is unavailable: {0}; retry")]
    Relay(#[from] RelayError),
}

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
    /// Shared with the pruner, which asks it who watches a topic.
    relay: Arc<dyn Relay>,
    pipeline: Pipeline,
    presence: Presence,
    store: Arc<Store>,
    /// Publishes to topics with history commit through it.
    commits: GroupCommit,
    /// Committed events whose publisher left before relaying them.
    orphans: Orphans,
    retention: Arc<Retention>,
    /// The pruner and the committer.
    tasks: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Broker {
    /// Opens the store (applying migrations), starts the relay, the
    /// pipeline and the pruner; every background task stops when
    /// `shutdown` is cancelled.
    /// `node` names this node among restarts (see
    /// [`presence::redis::node_name`]).
    pub async fn new(
        settings: &Settings,
        node: &str,
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
        let shards = std::thread::available_parallelism().map_or(1, usize::from);
        let (inbound, lanes) = Inbound::new(shards);
        let book = presence::book_from_settings(settings, node, inbound.clone())?;
        let presence = Presence::start(book, &settings.presence, shutdown.clone());
        let relay = relay::from_settings(settings, inbound, shutdown.clone())?;
        let pipeline = Pipeline::start(
            Arc::clone(&relay),
            Arc::clone(&store),
            lanes,
            shutdown.clone(),
        );
        let pruner = tokio::spawn(run_pruner(
            Arc::clone(&store),
            Arc::clone(&retention),
            Arc::clone(&relay) as _,
            shutdown.clone(),
        ));
        let (orphans, orphaned) = tokio::sync::mpsc::unbounded_channel();
        let relayer = tokio::spawn(relay_orphans(
            Arc::clone(&relay),
            orphaned,
            shutdown.clone(),
        ));
        let (commits, committer) =
            GroupCommit::spawn(Arc::clone(&store), orphans.clone(), shutdown);
        Ok(Broker {
            relay,
            pipeline,
            presence,
            store,
            commits,
            orphans,
            retention,
            tasks: tokio::sync::Mutex::new(vec![pruner, committer, relayer]),
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
        // In a Redis Cluster, only the topics whose master is away refuse.
        let reachable = if events.is_empty() {
            self.is_ready()
        } else {
            events.iter().all(|e| self.relay.reachable(&e.topic))
        };
        if !reachable {
            return Err(PublishError::NotReady);
        }
        let (durable, live): (Vec<_>, Vec<_>) = events
            .into_iter()
            .enumerate()
            .partition(|(_, e)| self.retention.history(&e.topic));
        let mut offsets = vec![0; durable.len() + live.len()];

        if !durable.is_empty() {
            let (slots, events): (Vec<usize>, Vec<NewEvent>) = durable.into_iter().unzip();
            let committed = self.commits.append(events).await.map_err(|e| {
                tracing::warn!(error = %e, "publish not committed");
                PublishError::Store(e)
            })?;
            let (assigned, fresh) = committed.into_parts();
            for (slot, offset) in slots.into_iter().zip(assigned) {
                offsets[slot] = offset;
            }
            // Committed: relayed even if this publish is dropped meanwhile.
            let mut unrelayed = Unrelayed {
                events: fresh.clone(),
                orphans: &self.orphans,
            };
            self.relay.publish(fresh).await;
            unrelayed.events.clear();
        }
        if !live.is_empty() {
            let (slots, events): (Vec<usize>, Vec<(Topic, Payload)>) = live
                .into_iter()
                .map(|(slot, e)| (slot, (e.topic, e.payload)))
                .unzip();
            let assigned = self.relay.publish_live(events, now_ms()).await?;
            for (slot, offset) in slots.into_iter().zip(assigned) {
                offsets[slot] = offset;
            }
        }
        Ok(offsets)
    }

    /// Starts delivering `topic`'s events to `mailbox`. Returns once events
    /// after the returned head's `last` will reach it (for a topic with
    /// history; replay up to there).
    pub async fn subscribe(
        &self,
        topic: &Topic,
        mailbox: &Mailbox,
    ) -> Result<Option<Head>, StoreError> {
        let history = self.retention.history(topic);
        self.pipeline.subscribe(topic, mailbox, history).await
    }

    /// Stops delivering `topic`'s events to connection `id`; returns once
    /// what was delivered before is in its mailbox.
    pub async fn unsubscribe(&self, topic: &Topic, id: ConnId) {
        self.pipeline.unsubscribe(topic, id).await;
    }

    /// [`unsubscribe`](Self::unsubscribe) for a connection whose task is
    /// ending in a way that cannot wait (its drop guard).
    pub fn release(&self, topic: &Topic, id: ConnId) {
        self.pipeline.release(topic, id);
    }

    /// Starts (`listen`) or stops delivering `topic`'s presence diffs to
    /// `mailbox`, which subscribes to it.
    pub async fn listen(&self, topic: &Topic, mailbox: &Mailbox, listen: bool) {
        self.pipeline.listen(topic, mailbox, listen).await;
    }

    /// The node's presence: joins, leaves and pages.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// How many connections on this node subscribe to `topic`.
    pub async fn local_subscribers(&self, topic: &Topic) -> usize {
        self.pipeline.local_subscribers(topic).await
    }

    pub fn relay_state(&self) -> RelayState {
        self.relay.state()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Whether this node can publish and receive events right now.
    pub fn is_ready(&self) -> bool {
        self.relay.state() != RelayState::Disconnected
    }

    /// Waits for background work to finish once shutdown was requested.
    pub async fn stopped(&self) {
        // Before the relay: the node's members leave through Redis.
        self.presence.stopped().await;
        self.relay.stopped().await;
        self.pipeline.stopped().await;
        for task in self.tasks.lock().await.drain(..) {
            let _ = task.await;
        }
    }
}

/// Committed events not relayed yet: handed to the orphan relayer if the
/// publish is dropped before it relays them (its client went away).
struct Unrelayed<'a> {
    events: Vec<Arc<Event>>,
    orphans: &'a Orphans,
}

impl Drop for Unrelayed<'_> {
    fn drop(&mut self) {
        if !self.events.is_empty() {
            let _ = self.orphans.send(std::mem::take(&mut self.events));
        }
    }
}

/// Relays committed events whose publisher left before it could (see
/// [`Orphans`]), until shutdown. A repeat of an event already relayed is
/// dropped by each node's pipeline.
async fn relay_orphans(
    relay: Arc<dyn Relay>,
    mut orphaned: tokio::sync::mpsc::UnboundedReceiver<Vec<Arc<Event>>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            events = orphaned.recv() => match events {
                Some(events) => relay.publish(events).await,
                None => return,
            },
        }
    }
}
