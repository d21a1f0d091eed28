//! Presence: who is in a topic, across the cluster.
//!
//! A member is a token's `sub` (with what its `presence_info` claim says);
//! a user with several connections, on one node or on several, is one
//! member. It joins when its first connection subscribes to the topic with
//! `"presence": true` and leaves when its last such connection leaves.
//!
//! Each node counts its own connections per member ([`Presence::join`] and
//! [`Presence::leave`] never wait) and tells the topic's presence book
//! only of its members' comings and goings: changes are gathered for
//! `presence.batch_interval` and sent per topic together, a join and a
//! leave of one member within that time cancelling out. The book keeps
//! the union over nodes, emits a `presence_diff` only when a member joins
//! the union or leaves it, and numbers the diffs of each topic (`seq`,
//! within an `epoch`), so that a page of members (which says the `seq` it
//! includes) and the diffs after it add up to the truth.
//!
//! - [`local::LocalBook`] (no `redis.url`): one node; in memory.
//! - [`redis::RedisBook`] (cluster mode): in Redis. A node holds a lease
//!   on its *incarnation* (its name and a random id) and renews it; a node
//!   that stops renewing (killed, cut off) is reaped by any other node,
//!   which removes the members only it held, each leave sent once. A
//!   change under an incarnation without a lease is refused (fenced), so
//!   nothing lands under one being reaped. A node that could not tell the
//!   book of a change (Redis away) takes a new incarnation, joins
//!   everything it holds under it, and only then retires the old one:
//!   nothing is lost, and nobody still held leaves. A node whose lease was
//!   reaped does the same; its members were reported leaving meanwhile,
//!   and join again.

mod local;
pub mod redis;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, PresenceSettings, RedisMode, Settings};
use crate::protocol::{Member, PresencePage, PresenceQuery};
use crate::relay::Inbound;
use crate::telemetry::names;
use crate::topic::Topic;

pub use self::local::LocalBook;
pub use self::redis::RedisBook;

/// Most members sent to the book in one call.
const CHUNK: usize = 1000;

/// How long shutdown waits for the book to take this node's members out.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the book could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is unavailable: Redis cannot be reached")]
    Unreachable(#[from] ::redis::RedisError),
    #[error("presence is unavailable: Redis answered something unexpected")]
    UnexpectedReply,
    /// This node's incarnation has no lease any more (reaped as dead):
    /// nothing was changed under it.
    #[error("this node's presence lease is gone")]
    Fenced,
}

/// Where a topic's membership is kept: the union over every node.
pub trait Book: Send + Sync {
    /// Applies this node's changes to `topic`'s members: joins, then
    /// leaves, each only if it changes what this node holds. A diff goes
    /// to every node watching the topic when the union changed.
    fn apply<'a>(
        &'a self,
        topic: &'a Topic,
        joins: &'a [Member],
        leaves: &'a [String],
    ) -> BoxFuture<'a, Result<(), PresenceError>>;

    /// A page of `topic`'s members.
    fn page<'a>(
        &'a self,
        topic: &'a Topic,
        query: &'a PresenceQuery,
    ) -> BoxFuture<'a, Result<PresencePage, PresenceError>>;

    /// Starts a new incarnation of this node, holding nothing yet; the
    /// previous one stays until [`retire`](Self::retire).
    fn rotate(&self) -> BoxFuture<'_, Result<(), PresenceError>>;

    /// Retires the incarnations [`rotate`](Self::rotate) replaced: their
    /// members leave, unless held elsewhere.
    fn retire(&self) -> BoxFuture<'_, Result<(), PresenceError>>;

    /// Renews this node's lease; `false` when it was lost (reaped).
    fn renew(&self) -> BoxFuture<'_, Result<bool, PresenceError>>;

    /// Removes the members of nodes whose lease ran out.
    fn reap(&self) -> BoxFuture<'_, Result<(), PresenceError>>;

    /// This node stops: everything it holds leaves now.
    fn leave_all(&self) -> BoxFuture<'_, Result<(), PresenceError>>;
}

/// The book the settings ask for: in Redis when `redis.url` is set, in
/// memory otherwise (then diffs go straight to `inbound`). `node` names
/// this node among restarts (its host and port). With a Redis Cluster no
/// topic keeps presence yet (the settings refuse it), so the book is the
/// in-memory one and stays empty.
pub fn book_from_settings(
    settings: &Settings,
    node: &str,
    inbound: Inbound,
) -> Result<Arc<dyn Book>, ConfigError> {
    Ok(match &settings.redis.url {
        None => Arc::new(LocalBook::new(inbound)),
        Some(_) if settings.redis.mode == RedisMode::Cluster => Arc::new(LocalBook::new(inbound)),
        Some(url) => Arc::new(RedisBook::new(
            url,
            &settings.redis.prefix,
            node,
            &settings.presence,
        )?),
    })
}

/// The node's presence: its members per topic, and the task that keeps
/// the book up to date.
pub struct Presence {
    tracker: Arc<Tracker>,
    book: Arc<dyn Book>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Presence {
    /// Starts the tasks that tell `book` of this node's changes, renew the
    /// node's lease and reap dead nodes (each on its own, so that a long
    /// rejoin or reaping pass never delays a renewal); they stop on
    /// `shutdown`, taking this node's members out of the book.
    pub fn start(
        book: Arc<dyn Book>,
        settings: &PresenceSettings,
        shutdown: CancellationToken,
    ) -> Presence {
        let tracker = Arc::new(Tracker {
            state: Mutex::new(State {
                topics: HashMap::new(),
                dirty: HashSet::new(),
                rejoin: true,
            }),
            grace: settings.batch_interval,
        });
        let reaping = Arc::new(ReapGate::default());
        let tasks = vec![
            tokio::spawn(keep(
                Arc::clone(&tracker),
                Arc::clone(&book),
                settings.batch_interval,
                shutdown.clone(),
            )),
            tokio::spawn(renew(
                Arc::clone(&tracker),
                Arc::clone(&book),
                settings.node_ttl,
                Arc::clone(&reaping),
                shutdown.clone(),
            )),
            tokio::spawn(reap(
                Arc::clone(&book),
                settings.node_ttl,
                reaping,
                shutdown,
            )),
        ];
        Presence {
            tracker,
            book,
            tasks: tokio::sync::Mutex::new(tasks),
        }
    }

    /// One more connection of `sub` is in `topic`'s presence, with `info`
    /// (taken from its first connection). Never waits.
    pub fn join(&self, topic: &Topic, sub: &str, info: Option<Arc<str>>) {
        self.tracker.join(topic, sub, info);
    }

    /// One connection of `sub` left `topic`'s presence. Never waits
    /// (callable from `Drop`).
    pub fn leave(&self, topic: &Topic, sub: &str) {
        self.tracker.leave(topic, sub);
    }

    /// A page of `topic`'s members, or only their count.
    pub async fn page(
        &self,
        topic: &Topic,
        query: &PresenceQuery,
    ) -> Result<PresencePage, PresenceError> {
        self.book.page(topic, query).await
    }

    /// Waits for the tasks to end after shutdown.
    pub async fn stopped(&self) {
        for task in self.tasks.lock().await.drain(..) {
            let _ = task.await;
        }
    }
}

/// This node's members, and what the book does not know yet.
struct Tracker {
    state: Mutex<State>,
    /// How long a leave waits before the book is told (`batch_interval`):
    /// a user back within it, on any node, is not reported as leaving.
    grace: Duration,
}

struct State {
    topics: HashMap<Topic, Local>,
    /// Topics with changes the book does not have.
    dirty: HashSet<Topic>,
    /// The book must be told everything again, under a new incarnation.
    rejoin: bool,
}

/// One topic's members on this node.
#[derive(Default)]
struct Local {
    members: HashMap<String, Holding>,
    /// What the book must be told: per member, the change since it last
    /// was.
    pending: HashMap<String, Change>,
}

struct Holding {
    connections: u32,
    info: Option<Arc<str>>,
}

enum Change {
    Join(Option<Arc<str>>),
    /// Since when.
    Leave(Instant),
}

/// What the book must be told next.
enum Work {
    /// This node's changes, per topic.
    Changes(Vec<(Topic, Vec<Member>, Vec<String>)>),
    /// Everything this node holds, per topic, under a new incarnation.
    Rejoin(Vec<(Topic, Vec<Member>)>),
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(&self, topic: &Topic, sub: &str, info: Option<Arc<str>>) {
        let mut state = self.lock();
        let local = state.topics.entry(topic.clone()).or_default();
        if let Some(holding) = local.members.get_mut(sub) {
            holding.connections += 1;
            return;
        }
        local.members.insert(
            sub.to_owned(),
            Holding {
                connections: 1,
                info: info.clone(),
            },
        );
        // A leave the book has not seen yet cancels out.
        if local.pending.remove(sub).is_none() {
            local.pending.insert(sub.to_owned(), Change::Join(info));
        }
        state.dirty.insert(topic.clone());
        metrics::gauge!(names::PRESENCE_MEMBERS).increment(1.0);
    }

    fn leave(&self, topic: &Topic, sub: &str) {
        let mut state = self.lock();
        let Some(local) = state.topics.get_mut(topic) else {
            return;
        };
        let Some(holding) = local.members.get_mut(sub) else {
            return;
        };
        holding.connections -= 1;
        if holding.connections > 0 {
            return;
        }
        local.members.remove(sub);
        if local.pending.remove(sub).is_none() {
            local
                .pending
                .insert(sub.to_owned(), Change::Leave(Instant::now()));
        }
        state.dirty.insert(topic.clone());
        metrics::gauge!(names::PRESENCE_MEMBERS).decrement(1.0);
    }

    /// Takes what the book must be told; forgets topics left empty.
    fn take(&self) -> Work {
        let mut state = self.lock();
        let State {
            topics,
            dirty,
            rejoin,
        } = &mut *state;
        if std::mem::take(rejoin) {
            dirty.clear();
            topics.retain(|_, local| {
                local.pending.clear();
                !local.members.is_empty()
            });
            let all = topics
                .iter()
                .map(|(topic, local)| {
                    let members = local
                        .members
                        .iter()
                        .map(|(sub, holding)| Member {
                            sub: sub.clone(),
                            info: holding.info.clone(),
                        })
                        .collect();
                    (topic.clone(), members)
                })
                .collect();
            return Work::Rejoin(all);
        }
        let mut changes = Vec::with_capacity(dirty.len());
        let mut later = Vec::new();
        for topic in dirty.drain() {
            let Some(local) = topics.get_mut(&topic) else {
                continue;
            };
            let (mut joins, mut leaves) = (Vec::new(), Vec::new());
            local.pending.retain(|sub, change| match change {
                Change::Join(info) => {
                    joins.push(Member {
                        sub: sub.clone(),
                        info: info.take(),
                    });
                    false
                }
                // Held for the grace: a join elsewhere comes first.
                Change::Leave(since) if since.elapsed() < self.grace => true,
                Change::Leave(_) => {
                    leaves.push(sub.clone());
                    false
                }
            });
            if !local.pending.is_empty() {
                later.push(topic.clone());
            } else if local.members.is_empty() {
                topics.remove(&topic);
            }
            if !joins.is_empty() || !leaves.is_empty() {
                changes.push((topic, joins, leaves));
            }
        }
        dirty.extend(later);
        Work::Changes(changes)
    }

    /// The book may have missed changes: tell it everything again.
    fn rejoin(&self) {
        self.lock().rejoin = true;
    }
}

/// When reaping may run: held back after Redis was away (see [`reap`]).
#[derive(Default)]
struct ReapGate {
    /// Not before this; none: from the start.
    not_before: Mutex<Option<Instant>>,
}

impl ReapGate {
    fn lock(&self) -> MutexGuard<'_, Option<Instant>> {
        self.not_before.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No reaping for `wait` from now.
    fn hold(&self, wait: Duration) {
        *self.lock() = Some(Instant::now() + wait);
    }

    fn is_open(&self) -> bool {
        self.lock().is_none_or(|at| Instant::now() >= at)
    }
}

/// Tells the book of this node's changes every `interval`; on shutdown
/// takes this node's members out.
async fn keep(
    tracker: Arc<Tracker>,
    book: Arc<dyn Book>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut flush = tokio::time::interval(interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Logged when telling the book starts failing and when it recovers,
    // not at every attempt while Redis is away.
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = flush.tick() => match tell(&tracker, book.as_ref()).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("presence changes recorded again");
                }
                Ok(()) => {}
                Err(PresenceError::Fenced) => {
                    tracing::warn!("this node's presence lease is gone (reaped as dead); rejoining its members");
                    tracker.rejoin();
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "presence changes not recorded; rejoining once Redis answers");
                    }
                    tracker.rejoin();
                }
            },
        }
    }
    match tokio::time::timeout(LEAVE_TIMEOUT, book.leave_all()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "this node's members could not leave; they leave when its lease runs out")
        }
        Err(_) => tracing::warn!(
            "this node's members did not leave in time; they leave when its lease runs out"
        ),
    }
}

/// Renews this node's lease every sixth of `ttl`. A renewal that fails
/// (Redis away) holds reaping back for `ttl` (see [`reap`]); a lease found
/// gone makes the node rejoin under a new incarnation.
async fn renew(
    tracker: Arc<Tracker>,
    book: Arc<dyn Book>,
    ttl: Duration,
    reaping: Arc<ReapGate>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(ttl / 6);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = tick.tick() => match book.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("this node's presence lease is gone (reaped as dead, or Redis lost its data); rejoining its members");
                    tracker.rejoin();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "presence lease not renewed");
                    reaping.hold(ttl);
                }
            },
        }
    }
}

/// Reaps dead nodes' members every tenth of `ttl` (at most a second),
/// but not while `reaping` is held: after Redis was away, every
/// lease may have run out, and the other nodes get a `ttl` to renew
/// theirs before any is taken for dead.
async fn reap(
    book: Arc<dyn Book>,
    ttl: Duration,
    reaping: Arc<ReapGate>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval((ttl / 10).min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if !reaping.is_open() {
                    continue;
                }
                if let Err(e) = book.reap().await {
                    tracing::debug!(error = %e, "could not reap dead nodes' presence");
                    reaping.hold(ttl);
                }
            }
        }
    }
}

/// Tells the book what changed since last time.
async fn tell(tracker: &Tracker, book: &dyn Book) -> Result<(), PresenceError> {
    match tracker.take() {
        Work::Changes(changes) => {
            for (topic, joins, leaves) in &changes {
                if joins.len() + leaves.len() <= CHUNK {
                    // The usual case: one diff for the interval.
                    book.apply(topic, joins, leaves).await?;
                    continue;
                }
                for joins in joins.chunks(CHUNK) {
                    book.apply(topic, joins, &[]).await?;
                }
                for leaves in leaves.chunks(CHUNK) {
                    book.apply(topic, &[], leaves).await?;
                }
            }
        }
        Work::Rejoin(all) => {
            book.rotate().await?;
            for (topic, members) in &all {
                for joins in members.chunks(CHUNK) {
                    book.apply(topic, joins, &[]).await?;
                }
            }
            book.retire().await?;
        }
    }
    Ok(())
}
