//! Standalone mode's receiving side: one pub/sub connection to one Redis,
//! owned by one background task, `SUBSCRIBE`d to the channels of the
//! topics the node watches.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    CONNECT_TIMEOUT, Interest, MAX_BACKOFF, MIN_BACKOFF, Names, acknowledge, confirmed, hand_over,
    more_changes,
};
use crate::relay::Inbound;
use crate::telemetry::names;
use crate::topic::Topic;

/// The background task that owns the pub/sub connection.
pub(super) struct Subscriber {
    client: redis::Client,
    inbound: Inbound,
    /// The topics the node watches: subscribed whenever connected.
    wanted: HashSet<Topic>,
    /// Whether a connection succeeded before (the next one is a reconnect).
    ever_connected: bool,
    names: Names,
    interest: mpsc::UnboundedReceiver<Interest>,
    connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

/// Why a connected session of the subscriber ended.
enum Ended {
    Shutdown,
    Lost,
}

impl Subscriber {
    pub(super) fn new(
        client: redis::Client,
        inbound: Inbound,
        names: Names,
        interest: mpsc::UnboundedReceiver<Interest>,
        connected: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) -> Subscriber {
        Subscriber {
            client,
            inbound,
            wanted: HashSet::new(),
            ever_connected: false,
            names,
            interest,
            connected,
            shutdown,
        }
    }

    pub(super) async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut was_down_logged = false;
        loop {
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub());
            let pubsub = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                attempt = attempt => attempt.ok().and_then(Result::ok),
            };
            if let Some(pubsub) = pubsub {
                let (sink, stream) = pubsub.split();
                match self.serve(sink, stream, &mut backoff).await {
                    Ended::Shutdown => return,
                    Ended::Lost => {
                        tracing::warn!("redis relay disconnected; reconnecting");
                        was_down_logged = true;
                    }
                }
            } else if !was_down_logged {
                tracing::warn!("redis relay unavailable; retrying with backoff");
                was_down_logged = true;
            }
            if self.wait(backoff).await.is_err() {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Waits `delay` before reconnecting. Subscription changes meanwhile are
    /// acknowledged at once: the watched topics are subscribed on
    /// reconnect. `Err` on shutdown.
    async fn wait(&mut self, delay: Duration) -> Result<(), ()> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(()),
                _ = &mut sleep => return Ok(()),
                Some(change) = self.interest.recv() => {
                    self.apply(&change);
                    acknowledge(change);
                }
            }
        }
    }

    /// Records a change in the watched set.
    fn apply(&mut self, change: &Interest) {
        if change.watch {
            self.wanted.insert(change.topic.clone());
        } else {
            self.wanted.remove(&change.topic);
        }
    }

    /// Runs one connected session: restore subscriptions, then hand over
    /// messages and apply subscription changes until the connection drops.
    async fn serve(
        &mut self,
        mut sink: PubSubSink,
        mut stream: redis::aio::PubSubStream,
        backoff: &mut Duration,
    ) -> Ended {
        let mut subscribed: HashSet<Topic> = HashSet::new();
        if !self.wanted.is_empty() {
            let channels: Vec<String> = self.wanted.iter().map(|t| self.names.channel(t)).collect();
            if confirmed(sink.subscribe(channels)).await.is_err() {
                return Ended::Lost;
            }
            subscribed.clone_from(&self.wanted);
        }
        self.connected.store(true, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(1.0);
        if self.ever_connected {
            metrics::counter!(names::RELAY_RECONNECTS).increment(1);
        }
        self.ever_connected = true;
        *backoff = MIN_BACKOFF;
        tracing::info!(topics = subscribed.len(), "redis relay connected");
        // Events relayed while we were away are in the store.
        self.inbound.resync().await;

        let ended = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ended::Shutdown,
                message = stream.next() => match message {
                    Some(message) => hand_over(&self.names, &self.inbound, &message).await,
                    None => break Ended::Lost,
                },
                Some(change) = self.interest.recv() => {
                    // Changes that queued up meanwhile go together: one
                    // SUBSCRIBE / UNSUBSCRIBE round trip for all of them.
                    let changes = more_changes(change, &mut self.interest);
                    changes.iter().for_each(|c| self.apply(c));
                    let topics: Vec<&Topic> = changes.iter().map(|c| &c.topic).collect();
                    let lost = reconcile(&self.wanted, &self.names, &mut sink, &mut subscribed, &topics)
                        .await
                        .is_err();
                    changes.into_iter().for_each(acknowledge);
                    if lost {
                        break Ended::Lost;
                    }
                }
            }
        };
        self.connected.store(false, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(0.0);
        ended
    }
}

/// Brings the Redis subscriptions of `topics` in line with the watched
/// set.
async fn reconcile(
    wanted: &HashSet<Topic>,
    names: &Names,
    sink: &mut PubSubSink,
    subscribed: &mut HashSet<Topic>,
    topics: &[&Topic],
) -> redis::RedisResult<()> {
    let (mut add, mut remove): (Vec<Topic>, Vec<Topic>) = (Vec::new(), Vec::new());
    for &topic in topics {
        let wanted = wanted.contains(topic);
        if wanted && !subscribed.contains(topic) && !add.contains(topic) {
            add.push(topic.clone());
        } else if !wanted && subscribed.contains(topic) && !remove.contains(topic) {
            remove.push(topic.clone());
        }
    }
    if !add.is_empty() {
        let channels: Vec<String> = add.iter().map(|t| names.channel(t)).collect();
        confirmed(sink.subscribe(channels)).await?;
        subscribed.extend(add);
    }
    if !remove.is_empty() {
        let channels: Vec<String> = remove.iter().map(|t| names.channel(t)).collect();
        confirmed(sink.unsubscribe(channels)).await?;
        for topic in &remove {
            subscribed.remove(topic);
        }
    }
    Ok(())
}
