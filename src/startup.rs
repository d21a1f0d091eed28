//! Building and running a node: shared state, the HTTP server, and the
//! shutdown sequence.
//!
//! [`Application::build`] binds the listener (port 0 picks a free port,
//! which is how tests start isolated nodes) and reports the real address.
//! [`Application::run_until_stopped`] serves until SIGINT/SIGTERM or until
//! its [`shutdown`](Application::shutdown_token) token is cancelled, then
//! closes every WebSocket with 1001 (going away) and drains the server
//! within [`SHUTDOWN_GRACE`].

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::{ConfigError, Settings};
use crate::{http, ws};

/// How long in-flight requests get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (setting `server.bind`): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

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
    /// A random id for this node's process, for introspection and logs.
    pub node_id: String,
    pub started: std::time::Instant,
}

pub struct Application {
    server: Server,
    addr: SocketAddr,
    shutdown: CancellationToken,
    state: web::Data<AppState>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        crate::telemetry::metrics();
        let verifier = Verifier::new(&settings.auth)?;
        let addr = settings.bind_addr()?;
        let listener =
            TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let shutdown = CancellationToken::new();
        let broker = Broker::new(&settings, shutdown.clone()).await?;
        let state = web::Data::new(AppState {
            settings,
            verifier,
            broker,
            shutdown: shutdown.clone(),
            next_conn_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            node_id: rand::random::<[u8; 6]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            started: std::time::Instant::now(),
        });
        let state_handle = state.clone();
        let handshake_timeout = state.settings.server.handshake_timeout;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(http::json_config())
                .configure(http::routes)
                .configure(ws::routes)
                .configure(|cfg| {
                    if state.settings.ui.enabled {
                        http::ui::routes(cfg);
                    }
                })
                .default_service(web::to(http::not_found))
        })
        // Signals are handled in `run_until_stopped`, which must close the
        // WebSockets before the server can drain.
        .disable_signals()
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .client_request_timeout(handshake_timeout)
        .listen(listener)
        .map_err(|source| StartError::Bind { addr, source })?
        .run();
        Ok(Application {
            server,
            addr,
            shutdown,
            state: state_handle,
        })
    }

    /// The address the node actually listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cancelling this token shuts the node down, as SIGTERM does.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let mut server = std::pin::pin!(self.server);
        tokio::select! {
            result = &mut server => {
                // The server stopped on its own: stop everything else too.
                self.shutdown.cancel();
                self.state.broker.stopped().await;
                return result;
            }
            _ = shutdown_signal() => tracing::info!("shutdown signal received"),
            _ = self.shutdown.cancelled() => tracing::info!("shutdown requested"),
        }
        // Connections close with 1001 on this; then the server drains.
        self.shutdown.cancel();
        let (_, result) = tokio::join!(handle.stop(true), server);
        self.state.broker.stopped().await;
        result
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
