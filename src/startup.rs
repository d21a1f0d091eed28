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
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_service::{ServiceFactoryExt as _, fn_service, map_config};
use actix_web::dev::{AppConfig, Server};
use actix_web::{App, HttpServer, web};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::config::{ConfigError, Settings};
use crate::stall::Paced;
use crate::state::AppState;
use crate::{http, ws};

/// How long in-flight requests get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long an idle HTTP connection is kept open for its next request
/// (actix-web's default, named here because request deadlines are set
/// beside it).
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Connections the kernel queues for the node before it accepts them
/// (actix-web's default; Linux caps it at `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 1024;

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

pub struct Application {
    server: Server,
    addr: SocketAddr,
    shutdown: CancellationToken,
    state: web::Data<AppState>,
    /// The `/metrics` server on `metrics.bind`, when set.
    metrics_server: Option<(Server, SocketAddr)>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        raise_open_file_limit();
        crate::telemetry::metrics();
        crate::event::register_metrics();
        let verifier = Verifier::new(&settings.auth)?;
        let addr = settings.bind_addr()?;
        let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let shutdown = CancellationToken::new();
        let state =
            web::Data::new(AppState::new(settings, verifier, addr.port(), shutdown.clone()).await?);
        let state_handle = state.clone();
        let handshake_timeout = state.settings.server.handshake_timeout;
        let write_timeout = state.settings.server.write_timeout;
        let heartbeat_timeout = state.settings.server.heartbeat_timeout;
        // What actix-web's `HttpServer::listen` builds, plus the upgrade
        // hook: WebSocket handshakes leave the HTTP dispatcher with their
        // connection for `ws::upgrade`.
        let server = actix_server::Server::build()
            // Signals are handled in `run_until_stopped`, which must close
            // the WebSockets before the server can drain.
            .disable_signals()
            .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
            .listen("herald", listener, move || {
                let app_state = state.clone();
                let app = App::new()
                    .wrap(http::cors(&app_state.settings.server.allowed_origins))
                    // Outermost, so that every answer is timed.
                    .wrap(actix_web::middleware::from_fn(http::pace::pace))
                    .app_data(app_state.clone())
                    .app_data(http::json_config())
                    .configure(http::routes)
                    .configure(ws::routes)
                    .configure(|cfg| {
                        if app_state.settings.ui.enabled {
                            http::ui::routes(cfg);
                        }
                        if app_state.settings.metrics.bind.is_none() {
                            http::metrics_route(cfg);
                        }
                    })
                    .default_service(web::to(http::not_found));
                let ws_state = state.clone().into_inner();
                let upgrade = fn_service(move |(req, framed)| {
                    ws::upgrade(Arc::clone(&ws_state), req, framed)
                });
                let stopping = state.shutdown.clone();
                let http = HttpService::build()
                    // Idle keep-alive connections close as soon as shutdown
                    // starts, as under `HttpServer` (hidden in actix-http's
                    // docs, but what actix-web itself calls).
                    .graceful_shutdown_signal(move || stopping.clone().cancelled_owned())
                    .client_request_timeout(handshake_timeout)
                    .keep_alive(KEEP_ALIVE)
                    .client_disconnect_timeout(ws::LINGER)
                    // A client that closes its side is gone: an event
                    // stream it held ends then, not at its next heartbeat.
                    .h1_allow_half_closed(false)
                    .local_addr(addr)
                    // The socket's request clock, for `http::pace`.
                    .on_connect_ext(|io: &Paced<TcpStream>, ext| {
                        ext.insert(io.clock());
                    })
                    .upgrade(upgrade)
                    // Herald reads neither the host nor the address the
                    // router's config carries.
                    .finish(map_config(app, |_| AppConfig::default()));
                // What `HttpService::tcp` does, with every socket's writes
                // bounded by `server.write_timeout`, and a peer that
                // acknowledges nothing sent to it (a heartbeat) for
                // `server.heartbeat_timeout` taken for gone: a phone that
                // changed networks sends no FIN, and an event stream has no
                // pong to miss.
                fn_service(move |io: TcpStream| async move {
                    let _ =
                        socket2::SockRef::from(&io).set_tcp_user_timeout(Some(heartbeat_timeout));
                    let peer = io.peer_addr().ok();
                    Ok::<_, actix_http::error::DispatchError>((
                        Paced::new(io, write_timeout, handshake_timeout),
                        Protocol::Http1,
                        peer,
                    ))
                })
                .and_then(http)
            })
            .map_err(|source| StartError::Bind { addr, source })?
            .run();
        let metrics_server = match state_handle.settings.metrics_addr()? {
            None => None,
            Some(addr) => {
                let listener =
                    TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                let server = HttpServer::new(|| {
                    App::new()
                        .configure(http::metrics_route)
                        .default_service(web::to(http::not_found))
                })
                .workers(1)
                .disable_signals()
                .listen(listener)
                .map_err(|source| StartError::Bind { addr, source })?
                .run();
                Some((server, local))
            }
        };
        Ok(Application {
            server,
            addr,
            shutdown,
            state: state_handle,
            metrics_server,
        })
    }

    /// Where `/metrics` is served when `metrics.bind` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|(_, addr)| *addr)
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
        // The metrics server lives exactly as long as the node.
        let metrics = self.metrics_server.map(|(server, _)| {
            let handle = server.handle();
            (handle, tokio::spawn(server))
        });
        let result = Self::serve(self.server, self.shutdown, self.state).await;
        if let Some((handle, task)) = metrics {
            handle.stop(true).await;
            let _ = task.await;
        }
        result
    }

    async fn serve(
        server: Server,
        shutdown: CancellationToken,
        state: web::Data<AppState>,
    ) -> std::io::Result<()> {
        let handle = server.handle();
        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => {
                // The server stopped on its own: stop everything else too.
                shutdown.cancel();
                state.broker.stopped().await;
                return result;
            }
            _ = shutdown_signal() => tracing::info!("shutdown signal received"),
            _ = shutdown.cancelled() => tracing::info!("shutdown requested"),
        }
        // Connections close with 1001 on this; then the server drains.
        shutdown.cancel();
        let (_, result) = tokio::join!(handle.stop(true), server);
        state.broker.stopped().await;
        result
    }
}

/// Raises the process's soft limit of open files to its hard limit, as Go's
/// runtime and many servers do: every connection is a file, and the soft
/// limit (often 1,024) is a default for programs that open few. Logs both.
/// A node that still runs out keeps serving the connections it holds; the
/// HTTP server retries accepting every half second (logged once per
/// `telemetry::ACCEPT_ERROR_LOG_INTERVAL`, counted in
/// `herald_accept_errors_total`).
fn raise_open_file_limit() {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return;
    };
    let raised = if soft < hard {
        Resource::NOFILE.set(hard, hard).is_ok()
    } else {
        false
    };
    let now = if raised { hard } else { soft };
    tracing::info!(soft = now, hard, was = soft, "open files limit");
}

/// Binds the node's listener with room for [`ACCEPT_BACKLOG`] connections
/// waiting to be accepted (std's `bind` allows 128: a burst of clients
/// reconnecting at once would have SYNs dropped and retried a second
/// later).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)?.into_std()
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
