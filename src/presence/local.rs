//! A single node's presence book: in memory. Its diffs go straight back
//! into this node's [`Inbound`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;

use super::{Book, PresenceError};
use crate::event::PresenceDiff;
use crate::protocol::{Member, PresencePage, PresenceQuery};
use crate::relay::Inbound;
use crate::topic::Topic;

/// Rosters kept before empty ones are dropped (the sweep then waits until
/// twice as many are kept). An empty roster is kept so that its `seq`
/// goes on; one dropped starts again in a new epoch.
const SWEEP_MIN: usize = 1024;

pub struct LocalBook {
    inbound: Inbound,
    /// Never held across an await.
    rosters: Mutex<Rosters>,
}

struct Rosters {
    topics: HashMap<Topic, Roster>,
    sweep_at: usize,
}

impl Rosters {
    fn of(&mut self, topic: &Topic) -> &mut Roster {
        if self.topics.len() >= self.sweep_at && !self.topics.contains_key(topic) {
            self.topics.retain(|_, roster| !roster.members.is_empty());
            self.sweep_at = (self.topics.len() * 2).max(SWEEP_MIN);
        }
        self.topics.entry(topic.clone()).or_insert_with(Roster::new)
    }
}

/// One topic's members, in `sub` order (for pages).
struct Roster {
    epoch: String,
    seq: u64,
    members: BTreeMap<String, Option<Arc<str>>>,
}

impl Roster {
    fn new() -> Roster {
        Roster {
            epoch: new_epoch(),
            seq: 0,
            members: BTreeMap::new(),
        }
    }
}

/// A topic's presence epoch: random, so that a client holding a page from
/// an earlier one (another run of the node) takes a new page.
pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl LocalBook {
    pub fn new(inbound: Inbound) -> LocalBook {
        LocalBook {
            inbound,
            rosters: Mutex::new(Rosters {
                topics: HashMap::new(),
                sweep_at: SWEEP_MIN,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Rosters> {
        self.rosters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the changes; the diff when anything changed.
    fn change(&self, topic: &Topic, joins: &[Member], leaves: &[String]) -> Option<PresenceDiff> {
        let mut rosters = self.lock();
        let roster = rosters.of(topic);
        let joined: Vec<Member> = joins
            .iter()
            .filter(|m| !roster.members.contains_key(&m.sub))
            .cloned()
            .collect();
        for member in &joined {
            roster
                .members
                .insert(member.sub.clone(), member.info.clone());
        }
        let left: Vec<String> = leaves
            .iter()
            .filter(|sub| roster.members.remove(*sub).is_some())
            .cloned()
            .collect();
        if joined.is_empty() && left.is_empty() {
            return None;
        }
        roster.seq += 1;
        Some(PresenceDiff::new(
            topic.clone(),
            roster.epoch.clone(),
            roster.seq,
            joined,
            left,
        ))
    }
}

impl Book for LocalBook {
    fn apply<'a>(
        &'a self,
        topic: &'a Topic,
        joins: &'a [Member],
        leaves: &'a [String],
    ) -> BoxFuture<'a, Result<(), PresenceError>> {
        Box::pin(async move {
            // One caller (the presence task): diffs enter the lane in
            // `seq` order.
            if let Some(diff) = self.change(topic, joins, leaves) {
                self.inbound.presence(Arc::new(diff)).await;
            }
            Ok(())
        })
    }

    fn page<'a>(
        &'a self,
        topic: &'a Topic,
        query: &'a PresenceQuery,
    ) -> BoxFuture<'a, Result<PresencePage, PresenceError>> {
        Box::pin(async move {
            let rosters = self.lock();
            // A read makes nothing: a topic nobody joined is an empty
            // page in an epoch of its own (its first change starts
            // another, and the reader takes the pages again).
            let empty;
            let roster = match rosters.topics.get(topic) {
                Some(roster) => roster,
                None => {
                    empty = Roster::new();
                    &empty
                }
            };
            let count = roster.members.len() as u64;
            let (members, more) = if query.count_only {
                (None, false)
            } else {
                let from = match &query.after {
                    Some(after) => Bound::Excluded(after.as_str()),
                    None => Bound::Unbounded,
                };
                let mut range = roster
                    .members
                    .range::<str, _>((from, Bound::Unbounded))
                    .map(|(sub, info)| Member {
                        sub: sub.clone(),
                        info: info.clone(),
                    });
                let page: Vec<Member> = range.by_ref().take(query.limit).collect();
                let more = range.next().is_some();
                (Some(page), more)
            };
            Ok(PresencePage {
                epoch: roster.epoch.clone(),
                seq: roster.seq,
                count,
                members,
                more,
            })
        })
    }

    fn rotate(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async { Ok(()) })
    }

    fn retire(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async { Ok(()) })
    }

    fn renew(&self) -> BoxFuture<'_, Result<bool, PresenceError>> {
        Box::pin(async { Ok(true) })
    }

    fn reap(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async { Ok(()) })
    }

    fn leave_all(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        // The node is stopping, its clients with it: nobody is told.
        Box::pin(async { Ok(()) })
    }
}
