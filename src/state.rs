//! What every request handler and connection of a node shares: its
//! settings, token verifier, broker and connection counts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::{ConfigError, Settings};
use crate::rate::PerUser;

/// What every request handler and connection of this node shares.
pub struct AppState {
    pub settings: Settings,
    pub verifier: Verifier,
    pub broker: Broker,
    /// Cancelled when the node shuts down; every connection listens to it.
    pub shutdown: CancellationToken,
    pub(crate) next_conn_id: AtomicU64,
    /// Open WebSocket connections on this node.
    pub(crate) connections: AtomicUsize,
    /// Open WebSocket connections on this node per user (by the keyed
    /// hash of the token's `sub`, [`sub_keys`](Self::sub_keys)); users
    /// with none have no entry.
    pub(crate) connections_by_sub: Mutex<HashMap<u64, usize>>,
    /// Hashes a `sub` to its key in `connections_by_sub` (random per node).
    pub(crate) sub_keys: std::hash::RandomState,
    /// `limits.http_publish_rate`, per user.
    pub(crate) http_publish_rate: PerUser,
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
