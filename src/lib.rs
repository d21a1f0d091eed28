//! Herald: a live-notification broker.
//!
//! Backend services publish events to named topics over HTTP; browsers and
//! apps hold a WebSocket open, authenticate with a JWT, subscribe to the
//! topics their token grants and receive each event as it is published.
//!
//! # Modules
//! - [`cli`]: the command line (`serve`, `token`); `main` only calls it.
//! - [`config`]: settings, layered from defaults, files and `HERALD__*`.
//! - [`startup`]: builds a node (state, HTTP server) and runs it to shutdown.
//! - [`stall`]: a write the client does not take within
//!   `server.write_timeout` fails, and its connection with it.
//! - [`auth`]: JWT verification and signing; claims become [`auth::Grants`].
//! - [`topic`]: [`topic::Topic`] names and [`topic::Pattern`] grants.
//! - [`payload`]: what an event carries, and the one rule for what the edge
//!   accepts: exactly what both encodings can carry.
//! - [`event`]: an [`event::Event`] and its once-per-encoding wire frames.
//! - [`protocol`]: WebSocket ops, replies, encodings, error codes.
//! - [`http`]: publish and health routes; `ApiError` → status in one place.
//! - [`ws`]: the `/ws` handshake, the WebSocket transport (frames read
//!   and written on the socket itself) and the per-connection session task.
//! - [`broker`]: the routing interface (publish, subscribe) used by `http`
//!   and `ws`; [`hub`] is its local fan-out.
//! - [`rate`]: token buckets, per connection and per user.
//! - [`dev`]: the zero-setup development key and banner.
//! - [`files`]: what Herald writes to disk is private to its user.
//!
//! # The life of an event
//! `POST /api/v1/topics/{topic}/events` → `http` verifies the token, parses
//! the topic and checks the `publish` grant → [`broker::Broker::publish`]
//! assigns the topic's next offset and builds one `Arc<Event>` → the
//! [`hub::Hub`] offers it to the bounded mailbox of every local subscriber
//! → each connection's session task writes the event's frame, encoded once
//! per encoding and shared.
//!
//! # The life of a connection
//! `GET /ws` with `Upgrade: websocket` leaves the HTTP dispatcher with its
//! socket → origin, token and sub-protocol are checked before the 101 → the
//! connection's one task `select!`s over client frames, its mailbox,
//! eviction (mailbox overflow) and node shutdown, writing frames straight
//! to the socket → on exit it unsubscribes everything and sends a close
//! frame.

pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dev;
pub mod event;
pub mod files;
pub mod http;
pub mod hub;
pub mod payload;
pub mod protocol;
pub mod rate;
pub mod relay;
pub mod stall;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod topic;
pub mod ws;
