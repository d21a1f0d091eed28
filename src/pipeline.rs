//! The delivery pipeline: from an event arriving on this node to the
//! mailboxes of the connections that subscribed to its topic.
//!
//! It owns, per topic watched on this node:
//! - the interest set: the mailboxes of this node's subscribers;
//! - for a topic with history, the last offset delivered, so that
//!   subscribers see the topic's events in strictly increasing offset
//!   order, gap-free, exactly once. Events can arrive out of order (two
//!   publishers commit 5 and 6, and 6 is relayed first) or not at all (a
//!   message lost while Redis was away): a later offset with a hole before
//!   it first gets the hole filled from the store (an event is committed
//!   before it is relayed, and offsets are committed in order, so the store
//!   has the missing ones), and an offset delivered already is dropped;
//! - the seam between a new subscriber's replay and its live events: a
//!   subscriber is added at the topic's current position, which it is
//!   told; it replays up to there from the store, and everything after
//!   reaches its mailbox live.
//!
//! State is partitioned by topic over shards, one task each (as many as the
//! node has cores), so delivery runs on every core. A shard owns its
//! topics: no lock, and it never waits on the relay. The relay's
//! [`Inbound`](crate::relay::Inbound) lanes and the shards correspond one
//! to one.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, PresenceDiff, now_ms};
use crate::mailbox::{ConnId, Mailbox};
use crate::relay::{Arrival, Relay};
use crate::store::heads::HeadReader;
use crate::store::{Head, Page, Store, StoreError};
use crate::telemetry::names;
use crate::topic::Topic;

static DELIVERIES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!(names::DELIVERIES));
static FANOUT_LATENCY: LazyLock<metrics::Histogram> =
    LazyLock::new(|| metrics::histogram!(names::FANOUT_LATENCY));

/// Events read from the store per query while filling a gap, at most
/// 1 MiB of payloads.
const FILL_PAGE: Page = Page {
    events: 500,
    bytes: 1 << 20,
};

/// The handle the broker talks to the shards through.
pub struct Pipeline {
    shards: Vec<mpsc::UnboundedSender<Command>>,
    /// Reads subscribes' heads, many per query.
    heads: HeadReader,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What a shard is asked to do. Unbounded: each command is one client's
/// subscribe or unsubscribe (rate-limited per connection), and the drop
/// guard of a connection must be able to send one without waiting.
enum Command {
    /// First step of a subscribe: the topic is watched (kept while the
    /// subscriber reads its head); answers once the relay was asked, and
    /// whether the connection joins (false: it is subscribed already).
    Join {
        topic: Topic,
        id: ConnId,
        history: bool,
        watching: oneshot::Sender<(bool, futures_util::future::BoxFuture<'static, ()>)>,
    },
    /// Second step: the mailbox is added at the topic's position, which is
    /// answered (the seam).
    Start {
        topic: Topic,
        mailbox: Mailbox,
        /// The topic's last offset in the store, read after the watch took
        /// effect (topics with history).
        head: Option<u64>,
        seam: oneshot::Sender<u64>,
    },
    /// A subscriber leaves, or a subscribe is abandoned between its steps.
    Leave {
        topic: Topic,
        id: ConnId,
        done: Option<oneshot::Sender<()>>,
    },
    Count {
        topic: Topic,
        reply: oneshot::Sender<usize>,
    },
    /// A subscriber starts or stops receiving the topic's presence diffs.
    Listen {
        topic: Topic,
        mailbox: Mailbox,
        listen: bool,
        done: oneshot::Sender<()>,
    },
}

impl Pipeline {
    /// Starts one shard per lane; they stop when `shutdown` is cancelled.
    pub fn start(
        relay: Arc<dyn Relay>,
        store: Arc<Store>,
        lanes: Vec<mpsc::Receiver<Arrival>>,
        shutdown: CancellationToken,
    ) -> Pipeline {
        let (heads, head_reader) = HeadReader::spawn(Arc::clone(&store), shutdown.clone());
        let mut tasks = vec![head_reader];
        let mut shards = Vec::with_capacity(lanes.len());
        for arrivals in lanes {
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let shard = Shard {
                topics: HashMap::new(),
                relay: Arc::clone(&relay),
                store: Arc::clone(&store),
            };
            tasks.push(tokio::spawn(shard.run(
                commands_rx,
                arrivals,
                shutdown.clone(),
            )));
            shards.push(commands);
        }
        Pipeline {
            shards,
            heads,
            tasks: Mutex::new(tasks),
        }
    }

    fn shard(&self, topic: &Topic) -> &mpsc::UnboundedSender<Command> {
        &self.shards[topic.lane(self.shards.len())]
    }

    /// Starts delivering `topic`'s events to `mailbox`. Returns once every
    /// event after the seam will reach it: for a topic with history, its
    /// head with `last` at the seam (replay up to there; later events
    /// arrive live). Subscribing twice adds the mailbox once.
    pub async fn subscribe(
        &self,
        topic: &Topic,
        mailbox: &Mailbox,
        history: bool,
    ) -> Result<Option<Head>, StoreError> {
        let shard = self.shard(topic);
        let (watching, watch) = oneshot::channel();
        let join = Command::Join {
            topic: topic.clone(),
            id: mailbox.id,
            history,
            watching,
        };
        if shard.send(join).is_err() {
            return Err(StoreError::stopped());
        }
        let (joined, watch) = watch.await.map_err(|_| StoreError::stopped())?;
        // From here on the relay receives every event of the topic: a head
        // read now misses nothing.
        watch.await;
        let head = if history {
            match self.heads.head(topic).await {
                Ok(head) => Some(head),
                Err(e) => {
                    // A subscription held already stays as it was.
                    if joined {
                        self.leave(topic, mailbox.id, None);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        let (seam, at) = oneshot::channel();
        let start = Command::Start {
            topic: topic.clone(),
            mailbox: mailbox.clone(),
            head: head.as_ref().map(|h| h.last),
            seam,
        };
        if shard.send(start).is_err() {
            return Err(StoreError::stopped());
        }
        let last = at.await.map_err(|_| StoreError::stopped())?;
        Ok(head.map(|head| Head {
            // Past the head read, the store holds everything up to the
            // seam: a log empty when read is not empty any more.
            oldest: head.oldest.or((last > head.last).then_some(head.last + 1)),
            last,
            ..head
        }))
    }

    /// Stops delivering `topic`'s events to connection `id`; returns once
    /// every event offered to it before is in its mailbox.
    pub async fn unsubscribe(&self, topic: &Topic, id: ConnId) {
        let (done, left) = oneshot::channel();
        self.leave(topic, id, Some(done));
        let _ = left.await;
    }

    /// [`unsubscribe`](Self::unsubscribe) without waiting (callable from
    /// `Drop`).
    pub fn release(&self, topic: &Topic, id: ConnId) {
        self.leave(topic, id, None);
    }

    fn leave(&self, topic: &Topic, id: ConnId, done: Option<oneshot::Sender<()>>) {
        let leave = Command::Leave {
            topic: topic.clone(),
            id,
            done,
        };
        // Fails only once the shard stopped: nothing is left to leave.
        let _ = self.shard(topic).send(leave);
    }

    /// Starts (`listen`) or stops delivering `topic`'s presence diffs to
    /// `mailbox`, a subscriber of the topic; returns once in force. A
    /// subscriber that leaves the topic stops receiving them too.
    pub async fn listen(&self, topic: &Topic, mailbox: &Mailbox, listen: bool) {
        let (done, in_force) = oneshot::channel();
        let command = Command::Listen {
            topic: topic.clone(),
            mailbox: mailbox.clone(),
            listen,
            done,
        };
        if self.shard(topic).send(command).is_ok() {
            let _ = in_force.await;
        }
    }

    /// How many connections on this node subscribe to `topic`.
    pub async fn local_subscribers(&self, topic: &Topic) -> usize {
        let (reply, count) = oneshot::channel();
        let ask = Command::Count {
            topic: topic.clone(),
            reply,
        };
        if self.shard(topic).send(ask).is_err() {
            return 0;
        }
        count.await.unwrap_or(0)
    }

    /// Waits for the shards and the head reader to end after shutdown.
    pub async fn stopped(&self) {
        for task in self.tasks.lock().await.drain(..) {
            let _ = task.await;
        }
    }
}

/// One topic watched on this node.
struct Watched {
    mailboxes: Vec<Mailbox>,
    /// The subscribers that receive the topic's presence diffs.
    listeners: Vec<Mailbox>,
    /// Subscribers between their two steps.
    joining: Vec<ConnId>,
    position: Position,
}

/// Where a topic's delivery stands.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// No history: events are delivered as they arrive.
    Live,
    /// History, and no subscriber started yet: nothing is delivered, and
    /// the newest offset that arrived is remembered, so the first start
    /// can fill what came before its head was read. `resync`: the relay
    /// was away meanwhile, so the first start reads the store's head again
    /// and fills up to it.
    Starting { newest: u64, resync: bool },
    /// History: the last offset delivered.
    At(u64),
}

/// A partition of the node's topics, owned by one task.
struct Shard {
    topics: HashMap<Topic, Watched>,
    relay: Arc<dyn Relay>,
    store: Arc<Store>,
}

impl Shard {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut arrivals: mpsc::Receiver<Arrival>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(arrival) = arrivals.recv() => match arrival {
                    Arrival::Event(event) => self.arrive(event).await,
                    Arrival::Presence(diff) => self.presence(&diff),
                    Arrival::Resync => self.resync().await,
                },
                Some(command) = commands.recv() => self.command(command).await,
                else => return,
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Join {
                topic,
                id,
                history,
                watching,
            } => {
                let watched = self.topics.entry(topic.clone()).or_insert_with(|| {
                    metrics::gauge!(names::TOPICS_ACTIVE).increment(1.0);
                    Watched {
                        mailboxes: Vec::new(),
                        listeners: Vec::new(),
                        joining: Vec::new(),
                        position: if history {
                            Position::Starting {
                                newest: 0,
                                resync: false,
                            }
                        } else {
                            Position::Live
                        },
                    }
                });
                let joins = !watched.mailboxes.iter().any(|m| m.id == id);
                if joins {
                    watched.joining.push(id);
                }
                // Asked on every join, not only the topic's first: a second
                // subscriber must also wait until the first one's watch is
                // in force. The relay applies changes in order.
                let _ = watching.send((joins, self.relay.watch(&topic)));
            }
            Command::Start {
                topic,
                mailbox,
                head,
                seam,
            } => {
                let at = self.start(&topic, mailbox, head).await;
                let _ = seam.send(at);
            }
            Command::Leave { topic, id, done } => {
                self.leave(&topic, id);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Count { topic, reply } => {
                let count = self.topics.get(&topic).map_or(0, |w| w.mailboxes.len());
                let _ = reply.send(count);
            }
            Command::Listen {
                topic,
                mailbox,
                listen,
                done,
            } => {
                if let Some(watched) = self.topics.get_mut(&topic) {
                    watched.listeners.retain(|m| m.id != mailbox.id);
                    if listen && watched.mailboxes.iter().any(|m| m.id == mailbox.id) {
                        watched.listeners.push(mailbox);
                    }
                }
                let _ = done.send(());
            }
        }
    }

    /// Adds `mailbox` to `topic` at its position, returned: the seam.
    async fn start(&mut self, topic: &Topic, mailbox: Mailbox, head: Option<u64>) -> u64 {
        let Some(watched) = self.topics.get_mut(topic) else {
            // The subscriber left between its steps.
            return head.unwrap_or(0);
        };
        let Some(pos) = watched.joining.iter().position(|&id| id == mailbox.id) else {
            // Subscribed already, or left between its steps.
            return position_of(watched, head);
        };
        watched.joining.swap_remove(pos);
        match (watched.position, head) {
            (Position::Starting { newest, resync }, Some(head)) => {
                watched.position = Position::At(head);
                add(watched, mailbox);
                // Arrived while the topic was starting: events after the
                // head went nowhere, and now go to every subscriber.
                let mut until = newest;
                if resync {
                    match self.store.head(topic).await {
                        Ok(now) => until = until.max(now.last),
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "cannot catch up the topic; its next event fills its gap")
                        }
                    }
                }
                if until > head {
                    fill(&self.store, topic, watched, until).await;
                }
                head
            }
            (Position::At(last), Some(head)) => {
                // Committed before the head was read, not relayed here yet:
                // delivered now, so the new subscriber replays them instead.
                if head > last {
                    fill(&self.store, topic, watched, head).await;
                }
                add(watched, mailbox);
                position_of(watched, Some(head))
            }
            _ => {
                add(watched, mailbox);
                0
            }
        }
    }

    fn leave(&mut self, topic: &Topic, id: ConnId) {
        let Some(watched) = self.topics.get_mut(topic) else {
            return;
        };
        watched.listeners.retain(|m| m.id != id);
        if let Some(pos) = watched.mailboxes.iter().position(|m| m.id == id) {
            watched.mailboxes.swap_remove(pos);
            metrics::gauge!(names::SUBSCRIPTIONS).decrement(1.0);
        } else if let Some(pos) = watched.joining.iter().position(|&j| j == id) {
            watched.joining.swap_remove(pos);
        }
        if watched.mailboxes.is_empty() && watched.joining.is_empty() {
            self.topics.remove(topic);
            metrics::gauge!(names::TOPICS_ACTIVE).decrement(1.0);
            self.relay.unwatch(topic);
        }
    }

    /// Hands a presence diff to the topic's listeners on this node.
    fn presence(&self, diff: &Arc<PresenceDiff>) {
        metrics::counter!(names::PRESENCE_DIFFS).increment(1);
        if let Some(watched) = self.topics.get(&diff.topic) {
            for mailbox in &watched.listeners {
                mailbox.offer_presence(diff);
            }
        }
    }

    /// Delivers an event that arrived from the relay in its place: after
    /// filling any gap before it, and not at all if it was delivered
    /// already.
    async fn arrive(&mut self, event: Arc<Event>) {
        let Some(watched) = self.topics.get_mut(&event.topic) else {
            return;
        };
        match watched.position {
            Position::Live => {}
            Position::Starting { newest, resync } => {
                watched.position = Position::Starting {
                    newest: newest.max(event.offset),
                    resync,
                };
                return;
            }
            Position::At(last) => {
                if event.offset <= last {
                    return;
                }
                if event.offset > last + 1 {
                    fill(&self.store, &event.topic, watched, event.offset - 1).await;
                }
                watched.position = Position::At(event.offset);
            }
        }
        fan_out(&watched.mailboxes, &event);
    }

    /// Delivers every stored event of started topics newer than what was
    /// delivered (after the relay was away, events may be missing with no
    /// later event to reveal the gap). Heads are read in one query; topics
    /// still starting catch up when they start.
    async fn resync(&mut self) {
        for (topic, watched) in &mut self.topics {
            if let Position::Starting { resync, .. } = &mut watched.position {
                *resync = true;
            }
            // Presence diffs missed meanwhile cannot be filled from the
            // store: the listeners are told to read the pages again.
            if !watched.listeners.is_empty() {
                let reread = Arc::new(PresenceDiff::resync(topic.clone()));
                for mailbox in &watched.listeners {
                    mailbox.offer_presence(&reread);
                }
            }
        }
        let topics: Vec<Topic> = self
            .topics
            .iter()
            .filter(|(_, w)| matches!(w.position, Position::At(_)))
            .map(|(t, _)| t.clone())
            .collect();
        if topics.is_empty() {
            return;
        }
        let heads = match self.store.heads(&topics.iter().collect::<Vec<_>>()).await {
            Ok(heads) => heads,
            Err(e) => {
                tracing::warn!(topics = topics.len(), error = %e, "cannot catch up the topics; the next event of each fills its gap");
                return;
            }
        };
        for (topic, head) in topics.iter().zip(heads) {
            if let Some(watched) = self.topics.get_mut(topic) {
                fill(&self.store, topic, watched, head.last).await;
            }
        }
    }
}

/// The seam a subscriber already added is at.
fn position_of(watched: &Watched, head: Option<u64>) -> u64 {
    match watched.position {
        Position::At(last) => last,
        _ => head.unwrap_or(0),
    }
}

fn add(watched: &mut Watched, mailbox: Mailbox) {
    watched.mailboxes.push(mailbox);
    metrics::gauge!(names::SUBSCRIPTIONS).increment(1.0);
}

/// Delivers the stored events of `topic` after its position, up to and
/// including `until`, and moves the position there. A part the store
/// cannot give (pruned, or the store failing) is skipped.
async fn fill(store: &Store, topic: &Topic, watched: &mut Watched, until: u64) {
    let Position::At(last) = watched.position else {
        return;
    };
    if until <= last {
        return;
    }
    let mut range = store.range(topic, last, until, FILL_PAGE);
    loop {
        match range.next().await {
            Ok(Some(events)) => {
                for event in events {
                    fan_out(&watched.mailboxes, &Arc::new(event));
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%topic, error = %e, from = last + 1, until, "cannot fill a gap from the store; skipping it");
                break;
            }
        }
    }
    watched.position = Position::At(until);
}

/// Offers `event` to every mailbox; counts the deliveries once per event,
/// never per subscriber.
fn fan_out(mailboxes: &[Mailbox], event: &Arc<Event>) {
    let delivered = mailboxes.iter().filter(|m| m.offer(event)).count();
    DELIVERIES.increment(delivered as u64);
    FANOUT_LATENCY.record(now_ms().saturating_sub(event.ts) as f64 / 1000.0);
}
