//! Which topics keep history, for how long, and the task that prunes the
//! rest.
//!
//! `[[topics]]` rules are matched in order, first match wins; a rule's unset
//! fields and topics no rule matches take the `[retention]` defaults. A
//! topic without history (e.g. a price ticker) skips the store entirely:
//! its events are only relayed live and cannot be replayed.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::Store;
use crate::config::{ConfigError, Settings};
use crate::event::now_ms;
use crate::telemetry::names;
use crate::topic::{Pattern, Topic};

/// What is kept of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub history: bool,
    pub max_age: Duration,
    pub max_events: u64,
    /// Whether the topic keeps presence (`presence = true`).
    pub presence: bool,
}

pub struct Retention {
    rules: Vec<(Pattern, Policy)>,
    default: Policy,
    pub prune_interval: Duration,
}

impl Retention {
    pub fn from_settings(settings: &Settings) -> Result<Retention, ConfigError> {
        let r = &settings.retention;
        let default = Policy {
            history: r.history,
            max_age: r.max_age,
            max_events: r.max_events,
            presence: false,
        };
        let mut rules = Vec::with_capacity(settings.topics.len());
        for rule in &settings.topics {
            let pattern = Pattern::parse(&rule.pattern).map_err(|e| {
                ConfigError::invalid(
                    "topics.pattern",
                    "(config file only)",
                    format!("{:?}: {e}", rule.pattern),
                )
            })?;
            rules.push((
                pattern,
                Policy {
                    history: rule.history.unwrap_or(default.history),
                    max_age: rule.max_age.unwrap_or(default.max_age),
                    max_events: rule.max_events.unwrap_or(default.max_events),
                    presence: rule.presence.unwrap_or(false),
                },
            ));
        }
        Ok(Retention {
            rules,
            default,
            prune_interval: r.prune_interval,
        })
    }

    pub fn policy(&self, topic: &Topic) -> Policy {
        self.rules
            .iter()
            .find(|(pattern, _)| pattern.matches(topic))
            .map_or(self.default, |(_, policy)| *policy)
    }

    pub fn history(&self, topic: &Topic) -> bool {
        self.policy(topic).history
    }

    /// Whether `topic` keeps presence.
    pub fn presence(&self, topic: &Topic) -> bool {
        self.policy(topic).presence
    }

    /// Every policy, the default's included.
    fn policies(&self) -> impl Iterator<Item = &Policy> {
        std::iter::once(&self.default).chain(self.rules.iter().map(|(_, p)| p))
    }

    /// The shortest `max_age` of any policy: no event younger is pruned.
    fn shortest_max_age(&self) -> Duration {
        self.policies()
            .map(|p| p.max_age)
            .min()
            .unwrap_or(self.default.max_age)
    }

    /// The smallest `max_events` of any policy.
    fn fewest_max_events(&self) -> u64 {
        self.policies()
            .map(|p| p.max_events)
            .min()
            .unwrap_or(self.default.max_events)
    }
}

/// Tells which topics nobody watches anywhere: no subscriber on any node.
/// A topic's log is removed only then (the relay answers it).
pub trait Watchers: Send + Sync {
    /// The topics of `topics` that no node subscribes to. When this cannot
    /// be known (Redis unreachable), none.
    fn unwatched(&self, topics: Vec<Topic>) -> BoxFuture<'_, Vec<Topic>>;
}

/// What one pruning pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    /// Topic logs removed entirely (no event left, nobody watching).
    pub topics: u64,
}

/// Prunes by the policies each `prune_interval`, until `shutdown`.
pub async fn run_pruner(
    store: Arc<Store>,
    retention: Arc<Retention>,
    watchers: Arc<dyn Watchers>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(retention.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        match prune_once(&store, &retention, watchers.as_ref()).await {
            Ok(pruned) => {
                metrics::histogram!(names::PRUNE_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(names::PRUNED_EVENTS).increment(pruned.events);
                metrics::counter!(names::TOPICS_REMOVED).increment(pruned.topics);
                if pruned != Pruned::default() {
                    tracing::debug!(events = pruned.events, topics = pruned.topics, "pruned");
                }
            }
            Err(e) => {
                metrics::counter!(names::PRUNE_FAILURES).increment(1);
                tracing::warn!(error = %e, "pruning failed; will retry");
            }
        }
    }
}

/// One pruning pass. Each step is a few set-based statements whose cost
/// grows with what they delete (and, for counts and empty logs, with the
/// topics that have a log, never with every topic that ever had one):
/// 1. events older than their topic's `max_age`, found through the `ts`
///    index;
/// 2. events beyond their topic's `max_events`;
/// 3. logs left with no event that nobody watches, removed entirely (a
///    later publish starts a new log, in a new epoch).
pub async fn prune_once(
    store: &Store,
    retention: &Retention,
    watchers: &dyn Watchers,
) -> Result<Pruned, super::StoreError> {
    let now = now_ms();
    let cutoff =
        |age: Duration| now.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    let mut pruned = Pruned::default();

    let old = store
        .topics_with_events_before(cutoff(retention.shortest_max_age()))
        .await?;
    let mut by_age: BTreeMap<Duration, Vec<&Topic>> = BTreeMap::new();
    for topic in &old {
        by_age
            .entry(retention.policy(topic).max_age)
            .or_default()
            .push(topic);
    }
    for (age, topics) in by_age {
        pruned.events += store.delete_before(&topics, cutoff(age)).await?;
    }

    let over = store.topics_over(retention.fewest_max_events()).await?;
    let beyond: Vec<(&Topic, u64)> = over
        .iter()
        .filter_map(|(topic, last)| {
            let keep = retention.policy(topic).max_events;
            (*last > keep).then(|| (topic, last - keep))
        })
        .collect();
    pruned.events += store.delete_through(&beyond).await?;

    let empty = store.empty_topics().await?;
    let unwatched: HashSet<Topic> = watchers
        .unwatched(empty.iter().map(|(t, _)| t.clone()).collect())
        .await
        .into_iter()
        .collect();
    let removable: Vec<(&Topic, u64)> = empty
        .iter()
        .filter(|(t, _)| unwatched.contains(t))
        .map(|(t, last)| (t, *last))
        .collect();
    pruned.topics = store.remove_topics(&removable).await?;
    Ok(pruned)
}
