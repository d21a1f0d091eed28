//! Which topics keep history, for how long, and the task that prunes the
//! rest.
//!
//! `[[topics]]` rules are matched in order, first match wins; a rule's unset
//! fields and topics no rule matches take the `[retention]` defaults. A
//! topic without history (e.g. a price ticker) skips the store entirely:
//! its events are only relayed live and cannot be replayed.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;
use crate::config::{ConfigError, Settings};
use crate::event::now_ms;
use crate::topic::{Pattern, Topic};

/// What is kept of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub history: bool,
    pub max_age: Duration,
    pub max_events: u64,
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
}

/// Prunes every topic's log by its policy each `prune_interval`, until
/// `shutdown`.
pub async fn run_pruner(store: Arc<Store>, retention: Arc<Retention>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(retention.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match prune_once(&store, &retention).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned old events"),
            Err(e) => tracing::warn!(error = %e, "pruning failed; will retry"),
        }
    }
}

/// One pruning pass over every topic; returns how many events went.
pub async fn prune_once(store: &Store, retention: &Retention) -> Result<u64, super::StoreError> {
    let mut pruned = 0;
    for topic in store.topics().await? {
        let policy = retention.policy(&topic);
        let max_age_ms = u64::try_from(policy.max_age.as_millis()).unwrap_or(u64::MAX);
        let before = now_ms().saturating_sub(max_age_ms);
        pruned += store.prune(&topic, before, policy.max_events).await?;
    }
    Ok(pruned)
}
