//! What every request handler and connection of a node shares: its
//! settings, token verifier, broker and connection counts, and the
//! [`ConnectionSlot`] each WebSocket or event stream holds in those counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::auth::Grants;
use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::{ConfigError, Settings};
use crate::rate::PerUser;
use crate::telemetry::names;

/// What every request handler and connection of this node shares.
pub struct AppState {
    pub settings: Settings,
    pub verifier: Verifier,
    pub broker: Broker,
    /// Cancelled when the node shuts down; every connection listens to it.
    pub shutdown: CancellationToken,
    pub(crate) next_conn_id: AtomicU64,
    /// Open WebSocket connections and event streams on this node.
    pub(crate) connections: AtomicUsize,
    /// Open WebSocket connections and event streams on this node per user (by the keyed
    /// hash of the token's `sub`, [`sub_keys`](Self::sub_keys)); users
    /// with none have no entry.
    pub(crate) connections_by_sub: Mutex<HashMap<u64, usize>>,
    /// Hashes a `sub` to its key in `connections_by_sub` (random per node).
    pub(crate) sub_keys: std::hash::RandomState,
    /// `limits.http_publish_rate`, per user.
    pub(crate) http_publish_rate: PerUser,
    /// `limits.http_read_rate`, per user.
    pub(crate) http_read_rate: PerUser,
    /// A random id for this node's process, for introspection and logs.
    pub node_id: String,
    pub started: std::time::Instant,
}

impl AppState {
    /// A node's shared state: its broker (store, relay and background
    /// tasks, stopped by `shutdown`) and its empty counters.
    /// `port`: where the node listens, which names it among restarts.
    pub async fn new(
        settings: Settings,
        verifier: Verifier,
        port: u16,
        shutdown: CancellationToken,
    ) -> Result<AppState, ConfigError> {
        let node = crate::presence::redis::node_name(port);
        let broker = Broker::new(&settings, &node, shutdown.clone()).await?;
        Ok(AppState {
            http_publish_rate: PerUser::new(settings.limits.http_publish_rate),
            http_read_rate: PerUser::new(settings.limits.http_read_rate),
            settings,
            verifier,
            broker,
            shutdown,
            next_conn_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            connections_by_sub: Mutex::default(),
            sub_keys: std::hash::RandomState::new(),
            node_id: rand::random::<[u8; 6]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            started: std::time::Instant::now(),
        })
    }
}

/// Why a connection or stream was refused a [`ConnectionSlot`].
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("this node is at its connection limit ({0}, limits.max_connections); try another node")]
    Node(usize),
    #[error(
        "this user already holds {0} connections on this node (limits.max_connections_per_sub)"
    )]
    User(usize),
}

/// One place under `limits.max_connections` and under its user's
/// `limits.max_connections_per_sub`, given back when dropped. A WebSocket
/// connection and an event stream each hold one.
pub(crate) struct ConnectionSlot {
    state: Arc<AppState>,
    /// The user's key in `connections_by_sub`: a keyed 64-bit hash of the
    /// `sub`, not a copy of it, to keep every connection small.
    sub: u64,
}

impl ConnectionSlot {
    /// A place for a connection of the holder of `grants`, whose token may
    /// set its own `max_connections_per_sub`.
    pub(crate) fn acquire(
        state: &Arc<AppState>,
        grants: &Grants,
    ) -> Result<ConnectionSlot, SlotError> {
        let max = state.settings.limits.max_connections;
        if state.connections.fetch_add(1, Ordering::Relaxed) >= max {
            state.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(SlotError::Node(max));
        }
        let per_sub = grants
            .limits
            .max_connections_per_sub
            .map_or(state.settings.limits.max_connections_per_sub, |own| {
                own as usize
            });
        let sub = std::hash::BuildHasher::hash_one(&state.sub_keys, &grants.sub);
        {
            let mut by_sub = lock(&state.connections_by_sub);
            let held = by_sub.entry(sub).or_insert(0);
            if *held >= per_sub {
                drop(by_sub);
                state.connections.fetch_sub(1, Ordering::Relaxed);
                return Err(SlotError::User(per_sub));
            }
            *held += 1;
        }
        metrics::gauge!(names::CONNECTIONS).increment(1.0);
        Ok(ConnectionSlot {
            state: Arc::clone(state),
            sub,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        {
            let mut by_sub = lock(&self.state.connections_by_sub);
            if let Some(held) = by_sub.get_mut(&self.sub) {
                *held -= 1;
                if *held == 0 {
                    by_sub.remove(&self.sub);
                }
            }
        }
        self.state.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(names::CONNECTIONS).decrement(1.0);
    }
}

/// The lock, even if a thread panicked holding it (the counts stay right:
/// no critical section here can panic half-way).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
