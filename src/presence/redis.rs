//! Cluster mode: the presence book in Redis.
//!
//! Per topic `T`, under `{prefix}presence:{T}:` (hash-tagged by topic; the
//! relay channel and the per-node sets are not, so this book needs a
//! standalone Redis):
//! - `node:{incarnation}`: hash, the `sub`s one incarnation of a node
//!   holds;
//! - `holders`: hash, per `sub`, how many incarnations hold it (a member
//!   joins the union at 1 and leaves it at 0);
//! - `members`: sorted set of the `sub`s, all scored 0: pages in `sub`
//!   order (`ZRANGE … BYLEX`), the count in O(1) (`ZCARD`);
//! - `info`: hash, per `sub`, its `presence_info`;
//! - `meta`: hash, the topic's presence `epoch` and `seq`; it outlives the
//!   last member by a day, so that `seq` goes on.
//!
//! Per node: `{prefix}presence:leases`, a sorted set of incarnations
//! scored by when their lease runs out (Redis's clock);
//! `{prefix}presence:reaping`, incarnations being reaped, scored by when
//! the claim runs out (another node then takes over); and
//! `{prefix}presence:inc:{incarnation}`, the topics an incarnation joined.
//!
//! Every change runs as one script per topic, which publishes the diff on
//! the topic's relay channel (`p {json}`, see [`crate::relay::redis`]):
//! only a change of the union is published, each numbered once, so a leave
//! is sent once however many nodes reap the same incarnation.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use secrecy::SecretString;

use super::local::new_epoch;
use super::{Book, PresenceError};
use crate::config::{ConfigError, PresenceSettings};
use crate::protocol::{Member, PresencePage, PresenceQuery};
use crate::relay::redis::{channel, connect_lazily};
use crate::topic::Topic;

/// How long a topic's `epoch` and `seq` outlive its last member.
const IDLE_META_MS: u64 = 24 * 3600 * 1000;
/// Incarnations claimed per reaping pass, from each of the two sets.
const REAP_BATCH: usize = 10;

/// Applies one incarnation's changes to a topic, and publishes the diff of
/// the union, numbered. KEYS: node, holders, members, info, meta, channel,
/// leases, the incarnation's topics. ARGV: epoch if new, meta TTL once
/// empty (ms), mode (`c`: the changes that follow, refused with -1 unless
/// the incarnation holds a lease, so that nothing lands under one being
/// reaped; `a`: everything the incarnation holds leaves), the incarnation,
/// the topic, number of joins n, n pairs of `sub` and info (JSON text or
/// empty), then the `sub`s leaving. Returns the new `seq`, or 0 when the
/// union is the same.
const APPLY: &str = r#"
local joins, leaves = {}, {}
local function leave(sub)
  if redis.call('HDEL', KEYS[1], sub) == 1 then
    if redis.call('HINCRBY', KEYS[2], sub, -1) <= 0 then
      redis.call('HDEL', KEYS[2], sub)
      redis.call('ZREM', KEYS[3], sub)
      redis.call('HDEL', KEYS[4], sub)
      leaves[#leaves + 1] = sub
    end
  end
end
if ARGV[3] == 'a' then
  for _, sub in ipairs(redis.call('HKEYS', KEYS[1])) do leave(sub) end
  redis.call('DEL', KEYS[1])
else
  if not redis.call('ZSCORE', KEYS[7], ARGV[4]) then return -1 end
  local n = tonumber(ARGV[6])
  for i = 7, 5 + 2 * n, 2 do
    local sub, info = ARGV[i], ARGV[i + 1]
    if redis.call('HSETNX', KEYS[1], sub, 1) == 1 then
      if redis.call('HINCRBY', KEYS[2], sub, 1) == 1 then
        redis.call('ZADD', KEYS[3], 0, sub)
        if info ~= '' then redis.call('HSET', KEYS[4], sub, info) end
        joins[#joins + 1] = i
      end
    end
  end
  for i = 7 + 2 * n, #ARGV do leave(ARGV[i]) end
end
-- The incarnation's topics: those where it holds someone, for its reaper.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SADD', KEYS[8], ARGV[5])
else
  redis.call('SREM', KEYS[8], ARGV[5])
end
if #joins + #leaves == 0 then return 0 end
redis.call('HSETNX', KEYS[5], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[5], 'epoch')
local seq = redis.call('HINCRBY', KEYS[5], 'seq', 1)
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('PEXPIRE', KEYS[5], ARGV[2])
else
  redis.call('PERSIST', KEYS[5])
end
local joined = {}
for _, i in ipairs(joins) do
  local m = '{"sub":' .. cjson.encode(ARGV[i])
  if ARGV[i + 1] ~= '' then m = m .. ',"info":' .. ARGV[i + 1] end
  joined[#joined + 1] = m .. '}'
end
local left = {}
for _, sub in ipairs(leaves) do left[#left + 1] = '{"sub":' .. cjson.encode(sub) .. '}' end
redis.call('PUBLISH', KEYS[6], 'p {"epoch":' .. cjson.encode(epoch) .. ',"seq":' .. seq
  .. ',"joins":[' .. table.concat(joined, ',') .. '],"leaves":[' .. table.concat(left, ',') .. ']}')
return seq
"#;

/// A page of a topic's members with the `seq` it includes, or only the
/// count. KEYS: members, info, meta. ARGV: the epoch to answer for a topic
/// with none (nobody joined it, or not for a day), the `sub` to start after
/// (empty: from the first), most members, `1` for the count only. A read
/// writes nothing: a topic with no epoch gets one at its first change, and
/// a client that read it empty takes the pages again then (another epoch).
const PAGE: &str = r#"
local epoch = redis.call('HGET', KEYS[3], 'epoch') or ARGV[1]
local seq = tonumber(redis.call('HGET', KEYS[3], 'seq') or '0')
local count = redis.call('ZCARD', KEYS[1])
if ARGV[4] == '1' then return {epoch, seq, count, 0, {}, {}} end
local from = '-'
if ARGV[2] ~= '' then from = '(' .. ARGV[2] end
local limit = tonumber(ARGV[3])
local subs = redis.call('ZRANGE', KEYS[1], from, '+', 'BYLEX', 'LIMIT', 0, limit + 1)
local more = 0
if #subs > limit then
  subs[#subs] = nil
  more = 1
end
local infos = {}
if #subs > 0 then infos = redis.call('HMGET', KEYS[2], unpack(subs)) end
for i = 1, #subs do
  if not infos[i] then infos[i] = '' end
end
return {epoch, seq, count, more, subs, infos}
"#;

/// Sets an incarnation's lease to run out in ARGV[2] ms (Redis's clock).
/// ARGV[3] `renew`: only if it still holds one (returns 0 otherwise).
/// KEYS: leases.
const LEASE: &str = r#"
if ARGV[3] == 'renew' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[2], ARGV[1])
return 1
"#;

/// Claims incarnations to reap: leases run out, and claims of other
/// reapers run out (they stopped half-way). KEYS: leases, reaping. ARGV:
/// how long the claim lasts (ms), most from each set.
const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local claimed = {}
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  for _, inc in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, ARGV[2])) do
    redis.call('ZREM', KEYS[1], inc)
    redis.call('ZADD', KEYS[2], now + ARGV[1], inc)
    claimed[#claimed + 1] = inc
  end
end
return claimed
"#;

/// Gives an incarnation up for reaping at once. KEYS: leases, reaping.
/// ARGV: the incarnation.
const RETIRE: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"#;

pub struct RedisBook {
    conn: ConnectionManager,
    prefix: String,
    /// This node's name (host and port): incarnations are `{node}/{id}`.
    node: String,
    lease: Duration,
    incarnations: Mutex<Incarnations>,
    apply: redis::Script,
    page: redis::Script,
    lease_script: redis::Script,
    claim: redis::Script,
    retire: redis::Script,
}

#[derive(Default)]
struct Incarnations {
    current: Option<String>,
    /// Replaced by `current`, to retire once it holds everything.
    replaced: Vec<String>,
}

impl RedisBook {
    pub fn new(
        url: &SecretString,
        prefix: &str,
        node: &str,
        settings: &PresenceSettings,
    ) -> Result<RedisBook, ConfigError> {
        let (_, conn) = connect_lazily(url)?;
        Ok(RedisBook {
            conn,
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            // Renewed every sixth of the TTL; reaped within a tenth (at
            // most a second) of running out.
            lease: settings.node_ttl * 2 / 3,
            incarnations: Mutex::new(Incarnations::default()),
            apply: redis::Script::new(APPLY),
            page: redis::Script::new(PAGE),
            lease_script: redis::Script::new(LEASE),
            claim: redis::Script::new(CLAIM),
            retire: redis::Script::new(RETIRE),
        })
    }

    fn incarnations(&self) -> MutexGuard<'_, Incarnations> {
        self.incarnations.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Result<String, PresenceError> {
        self.incarnations()
            .current
            .clone()
            .ok_or(PresenceError::UnexpectedReply)
    }

    fn key(&self, topic: &str, part: &str) -> String {
        format!("{}presence:{{{topic}}}:{part}", self.prefix)
    }

    fn leases(&self) -> String {
        format!("{}presence:leases", self.prefix)
    }

    fn reaping(&self) -> String {
        format!("{}presence:reaping", self.prefix)
    }

    fn topics_of(&self, incarnation: &str) -> String {
        format!("{}presence:inc:{incarnation}", self.prefix)
    }

    fn ms(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs the apply script for `incarnation` on `topic` (by name).
    async fn run_apply(
        &self,
        topic: &Topic,
        incarnation: &str,
        mode: &str,
        joins: &[Member],
        leaves: &[String],
    ) -> Result<(), PresenceError> {
        let t = topic.as_str();
        let mut invocation = self.apply.prepare_invoke();
        invocation
            .key(self.key(t, &format!("node:{incarnation}")))
            .key(self.key(t, "holders"))
            .key(self.key(t, "members"))
            .key(self.key(t, "info"))
            .key(self.key(t, "meta"))
            .key(channel(&self.prefix, topic))
            .key(self.leases())
            .key(self.topics_of(incarnation))
            .arg(new_epoch())
            .arg(IDLE_META_MS)
            .arg(mode)
            .arg(incarnation)
            .arg(t)
            .arg(joins.len());
        for member in joins {
            invocation
                .arg(&member.sub)
                .arg(member.info.as_deref().unwrap_or(""));
        }
        for sub in leaves {
            invocation.arg(sub);
        }
        let mut conn = self.conn.clone();
        let seq: i64 = invocation.invoke_async(&mut conn).await?;
        if seq < 0 {
            return Err(PresenceError::Fenced);
        }
        Ok(())
    }

    /// Removes what `incarnation` held in every topic it joined, then the
    /// incarnation itself.
    async fn reap_one(&self, incarnation: &str) -> Result<(), PresenceError> {
        let mut conn = self.conn.clone();
        let topics: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.topics_of(incarnation))
            .query_async(&mut conn)
            .await?;
        for topic in &topics {
            // Names were checked when joined; anything else is not ours.
            if let Ok(topic) = Topic::parse(topic) {
                self.run_apply(&topic, incarnation, "a", &[], &[]).await?;
            }
        }
        redis::pipe()
            .del(self.topics_of(incarnation))
            .ignore()
            .zrem(self.reaping(), incarnation)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        tracing::info!(
            incarnation,
            topics = topics.len(),
            "reaped a node's presence"
        );
        Ok(())
    }

    /// Gives `incarnation` up for reaping at once.
    async fn retire_one(&self, incarnation: &str) -> Result<(), PresenceError> {
        let mut conn = self.conn.clone();
        self.retire
            .key(self.leases())
            .key(self.reaping())
            .arg(incarnation)
            .invoke_async::<u8>(&mut conn)
            .await?;
        Ok(())
    }

    /// This node's incarnations from an earlier run (same name).
    async fn earlier_runs(&self) -> Result<Vec<String>, PresenceError> {
        let mut conn = self.conn.clone();
        let all: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.leases())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        let mine = format!("{}/", self.node);
        Ok(all.into_iter().filter(|i| i.starts_with(&mine)).collect())
    }
}

impl Book for RedisBook {
    fn apply<'a>(
        &'a self,
        topic: &'a Topic,
        joins: &'a [Member],
        leaves: &'a [String],
    ) -> BoxFuture<'a, Result<(), PresenceError>> {
        Box::pin(async move {
            let incarnation = self.current()?;
            self.run_apply(topic, &incarnation, "c", joins, leaves)
                .await
        })
    }

    fn page<'a>(
        &'a self,
        topic: &'a Topic,
        query: &'a PresenceQuery,
    ) -> BoxFuture<'a, Result<PresencePage, PresenceError>> {
        Box::pin(async move {
            let t = topic.as_str();
            let mut invocation = self.page.prepare_invoke();
            invocation
                .key(self.key(t, "members"))
                .key(self.key(t, "info"))
                .key(self.key(t, "meta"))
                .arg(new_epoch())
                .arg(query.after.as_deref().unwrap_or(""))
                .arg(query.limit)
                .arg(if query.count_only { "1" } else { "0" });
            let mut conn = self.conn.clone();
            type Reply = (String, u64, u64, u8, Vec<String>, Vec<String>);
            let (epoch, seq, count, more, subs, infos): Reply =
                invocation.invoke_async(&mut conn).await?;
            if subs.len() != infos.len() {
                return Err(PresenceError::UnexpectedReply);
            }
            let members = (!query.count_only).then(|| {
                subs.into_iter()
                    .zip(infos)
                    .map(|(sub, info)| Member {
                        sub,
                        info: (!info.is_empty()).then(|| info.into()),
                    })
                    .collect()
            });
            Ok(PresencePage {
                epoch,
                seq,
                count,
                members,
                more: more == 1,
            })
        })
    }

    fn rotate(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async move {
            let first = self.incarnations().current.is_none();
            let earlier = if first {
                self.earlier_runs().await?
            } else {
                Vec::new()
            };
            let incarnation = format!("{}/{:08x}", self.node, rand::random::<u32>());
            let mut conn = self.conn.clone();
            self.lease_script
                .key(self.leases())
                .arg(&incarnation)
                .arg(Self::ms(self.lease))
                .arg("new")
                .invoke_async::<u8>(&mut conn)
                .await?;
            let mut incarnations = self.incarnations();
            incarnations.replaced.extend(earlier);
            if let Some(old) = incarnations.current.replace(incarnation) {
                incarnations.replaced.push(old);
            }
            Ok(())
        })
    }

    fn retire(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async move {
            let replaced = std::mem::take(&mut self.incarnations().replaced);
            for (i, old) in replaced.iter().enumerate() {
                if let Err(e) = self.retire_one(old).await {
                    self.incarnations()
                        .replaced
                        .extend(replaced[i..].iter().cloned());
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    fn renew(&self) -> BoxFuture<'_, Result<bool, PresenceError>> {
        Box::pin(async move {
            let Ok(incarnation) = self.current() else {
                // None yet: the first rotation makes one.
                return Ok(true);
            };
            let mut conn = self.conn.clone();
            let kept: u8 = self
                .lease_script
                .key(self.leases())
                .arg(&incarnation)
                .arg(Self::ms(self.lease))
                .arg("renew")
                .invoke_async(&mut conn)
                .await?;
            Ok(kept == 1)
        })
    }

    fn reap(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // A claim lasts as long as a lease: a reaper that dies
            // half-way is taken over after that.
            let claimed: Vec<String> = self
                .claim
                .key(self.leases())
                .key(self.reaping())
                .arg(Self::ms(self.lease))
                .arg(REAP_BATCH)
                .invoke_async(&mut conn)
                .await?;
            for incarnation in claimed {
                self.reap_one(&incarnation).await?;
            }
            Ok(())
        })
    }

    fn leave_all(&self) -> BoxFuture<'_, Result<(), PresenceError>> {
        Box::pin(async move {
            let Some(incarnation) = self.incarnations().current.take() else {
                return Ok(());
            };
            self.retire_one(&incarnation).await?;
            self.reap_one(&incarnation).await
        })
    }
}

/// A node's name for its incarnations: its host name and port, so that a
/// node restarted on the same host and port finds what its earlier run
/// left.
pub fn node_name(port: u16) -> String {
    // Without a host name, a name of its own: a restart then leaves the
    // earlier run's members to its lease, rather than risk retiring
    // another node's that fell back to the same name.
    let host =
        whoami::hostname().unwrap_or_else(|_| format!("unnamed-{:08x}", rand::random::<u32>()));
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{host}:{port}")
}
