//! Group commit: appends that arrive while a commit is in flight are
//! written together, in one transaction, as soon as it ends.
//!
//! One commit at a time is in flight on a node. An append that finds none
//! commits at once, in its own task: a lone publish waits no longer than
//! before, and takes no detour. An append that finds one in flight queues
//! for the committer task, which commits next, taking everything queued
//! meanwhile (up to [`MAX_EVENTS`] events and [`MAX_BYTES`] payload
//! bytes): publishers under load share one transaction, one row lock per
//! topic and one `fsync` instead of waiting for each other's. Order,
//! offsets and idempotency are the store's, as for any batch: each topic's
//! events get gap-free offsets in the order they were queued.
//!
//! An append whose publisher went away while it waited in the queue is
//! committed all the same; its events are handed to the `orphans` channel,
//! for the broker to relay, so that no committed event waits for the
//! topic's next one to be delivered.
//!
//! A group that fails is committed again one append at a time, when its
//! failure could be one append's own (an error from the database), so
//! that each append gets the answer it would have had alone; when the
//! store itself is unreachable, every append of the group gets that error.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Appended, NewEvent, Store, StoreError};
use crate::event::{Event, now_ms};
use crate::telemetry::names;

/// Most events in one group (an append above it commits alone).
pub const MAX_EVENTS: usize = 1000;
/// Most payload bytes in one group (an append above it commits alone).
pub const MAX_BYTES: usize = 4 << 20;
/// Appends waiting for the committer; publishers wait when it is full.
const QUEUE: usize = 4096;

/// What an append became: its events (given back), what happened to each,
/// and the publish time they were committed with.
pub struct Committed {
    pub events: Vec<NewEvent>,
    pub appended: Vec<Appended>,
    pub ts: u64,
}

impl Committed {
    /// Each event's offset, in order, and the events that are new (not
    /// repeats of an idempotency key), ready to relay.
    pub fn into_parts(self) -> (Vec<u64>, Vec<Arc<Event>>) {
        let mut offsets = Vec::with_capacity(self.events.len());
        let mut fresh = Vec::new();
        for (event, done) in self.events.into_iter().zip(self.appended) {
            offsets.push(done.offset);
            if !done.duplicate {
                fresh.push(Arc::new(Event::new(
                    event.topic,
                    done.offset,
                    self.ts,
                    event.payload,
                )));
            }
        }
        (offsets, fresh)
    }
}

/// Where the committer hands the new events of appends whose publisher
/// left before the answer.
pub type Orphans = mpsc::UnboundedSender<Vec<Arc<Event>>>;

struct Request {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

impl Request {
    fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.payload.len()).sum()
    }
}

/// The handle appends go through.
pub struct GroupCommit {
    store: Arc<Store>,
    /// The one commit in flight: held by a lone append or the committer
    /// for the length of a commit (released on drop, even when the
    /// append's future is dropped mid-way).
    slot: Arc<Semaphore>,
    requests: mpsc::Sender<Request>,
}

impl GroupCommit {
    /// Starts the committing task; it ends when `shutdown` is cancelled.
    pub fn spawn(
        store: Arc<Store>,
        orphans: Orphans,
        shutdown: CancellationToken,
    ) -> (GroupCommit, JoinHandle<()>) {
        let (requests, rx) = mpsc::channel(QUEUE);
        let slot = Arc::new(Semaphore::new(1));
        let committer = Committer {
            store: Arc::clone(&store),
            slot: Arc::clone(&slot),
            orphans,
        };
        let task = tokio::spawn(committer.run(rx, shutdown));
        let commits = GroupCommit {
            store,
            slot,
            requests,
        };
        (commits, task)
    }

    /// Appends `events` in order (see [`Store::append`]): at once when no
    /// commit is in flight, else together with whatever else queued for
    /// the next one.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Committed, StoreError> {
        if let Ok(_in_flight) = self.slot.try_acquire() {
            return commit_alone(&self.store, events).await;
        }
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request { events, reply }).await.is_err() {
            return Err(StoreError::stopped());
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::stopped()))
    }
}

/// The task that commits what queued.
struct Committer {
    store: Arc<Store>,
    slot: Arc<Semaphore>,
    orphans: Orphans,
}

impl Committer {
    async fn run(self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        // An append that did not fit in the previous group leads the next.
        let mut next: Option<Request> = None;
        loop {
            let first = match next.take() {
                Some(request) => request,
                None => tokio::select! {
                    () = shutdown.cancelled() => return,
                    request = rx.recv() => match request {
                        Some(request) => request,
                        None => return,
                    },
                },
            };
            // Waits for the commit in flight; what queues meanwhile joins.
            let Ok(_in_flight) = self.slot.acquire().await else {
                return;
            };
            let (mut events, mut bytes) = (first.events.len(), first.bytes());
            let mut group = vec![first];
            while events < MAX_EVENTS && bytes < MAX_BYTES {
                let Ok(request) = rx.try_recv() else { break };
                let (more, size) = (request.events.len(), request.bytes());
                if events + more > MAX_EVENTS || bytes + size > MAX_BYTES {
                    next = Some(request);
                    break;
                }
                events += more;
                bytes += size;
                group.push(request);
            }
            self.commit(group).await;
        }
    }

    /// Commits a group in one transaction and answers each of its appends.
    async fn commit(&self, group: Vec<Request>) {
        let ts = now_ms();
        let mut sizes = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut all = Vec::new();
        for request in group {
            sizes.push(request.events.len());
            replies.push(request.reply);
            all.extend(request.events);
        }
        let result = timed(self.store.append(&all, ts)).await;
        metrics::histogram!(names::COMMIT_GROUP_EVENTS).record(all.len() as f64);
        match result {
            Ok(appended) => {
                let mut events = all.into_iter();
                let mut appended = appended.into_iter();
                for (size, reply) in sizes.into_iter().zip(replies) {
                    let committed = Committed {
                        events: events.by_ref().take(size).collect(),
                        appended: appended.by_ref().take(size).collect(),
                        ts,
                    };
                    self.answer(reply, Ok(committed));
                }
            }
            Err(e) if replies.len() > 1 && may_be_one_appends(&e) => {
                tracing::debug!(error = %e, appends = replies.len(), "group commit failed; committing its appends one by one");
                let mut events = all.into_iter();
                for (size, reply) in sizes.into_iter().zip(replies) {
                    let own = events.by_ref().take(size).collect();
                    let answer = commit_alone(&self.store, own).await;
                    self.answer(reply, answer);
                }
            }
            Err(e) => {
                let shared = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Shared(Arc::clone(&shared))));
                }
            }
        }
    }

    /// Answers an append; the new events of one whose publisher left are
    /// relayed all the same, through `orphans`.
    fn answer(
        &self,
        reply: oneshot::Sender<Result<Committed, StoreError>>,
        answer: Result<Committed, StoreError>,
    ) {
        if let Err(Ok(committed)) = reply.send(answer) {
            let (_, fresh) = committed.into_parts();
            if !fresh.is_empty() {
                let _ = self.orphans.send(fresh);
            }
        }
    }
}

/// Commits one append in its own transaction.
async fn commit_alone(store: &Store, events: Vec<NewEvent>) -> Result<Committed, StoreError> {
    let ts = now_ms();
    metrics::histogram!(names::COMMIT_GROUP_EVENTS).record(events.len() as f64);
    let appended = timed(store.append(&events, ts)).await?;
    Ok(Committed {
        events,
        appended,
        ts,
    })
}

/// Runs an append and records its commit time.
async fn timed<T>(append: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let result = append.await;
    metrics::histogram!(names::STORE_COMMIT).record(started.elapsed().as_secs_f64());
    result
}

/// Whether a group's failure could come from one of its appends rather
/// than from the store as a whole (which every append would meet alone).
fn may_be_one_appends(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Unavailable(sqlx::Error::Database(_) | sqlx::Error::Encode(_))
    )
}
