//! Herald: a live-notification broker.
//!
//! Backend services publish events to named topics over HTTP; browsers and
//! apps hold a WebSocket open, authenticate with a JWT, subscribe to the
//! topics their token grants and receive each event as it is published.
//!
//! # Modules, bottom to top
//! Each layer uses only those below it (`scripts/check-layers.py` checks).
//! - Foundation: [`config`] (settings from defaults, files and
//!   `HERALD__*`), [`telemetry`] (logs and metric names), [`rate`] (token
//!   buckets), [`stall`] (a write the client does not take within
//!   `server.write_timeout` fails), [`files`] (what Herald writes is
//!   private to its user).
//! - Pure types: [`topic`] (names and grant patterns), [`payload`] (what an
//!   event carries, and what the edge accepts), [`protocol`] (WebSocket
//!   ops, replies, encodings, error codes, frame bytes), [`auth`] (JWTs
//!   become [`auth::Grants`]), [`event`] (an event and its wire frames,
//!   encoded once per encoding).
//! - [`store`] (the durable log: offsets, epochs, ranges, group commit,
//!   retention),
//!   [`relay`] (how events move between nodes: loopback or Redis),
//!   [`mailbox`] (a connection's bounded queue of what goes out on its
//!   socket, written straight to it when nothing waits), [`presence`] (who
//!   is in a topic: this node's members, and the book of every node's, in
//!   memory or in Redis, with per-node leases).
//! - [`pipeline`] (per topic on this node: who subscribes, the last offset
//!   delivered, gap-fill, the replay/live seam), [`broker`] (publish and
//!   subscribe, for the edges), [`state`] (what handlers share, and each
//!   connection's place in the connection limits), [`registrations`]
//!   (what a subscriber holds, released when it goes).
//! - Edges: [`http`] (publish, history, health, SSE and NDJSON streams;
//!   errors → statuses in one place), [`ws`] (handshake, RFC 6455 transport, the session; errors →
//!   error frames or close codes in one place).
//! - Entry points: [`startup`] (builds and runs a node), [`cli`] (`serve`,
//!   `token`), [`dev`] (the zero-setup key and banner).
//!
//! # The life of an event
//! 1. `POST /api/v1/topics/{topic}/events` → `http::publish::publish_one`
//!    checks the token, topic, grant and payload.
//! 2. [`broker::Broker::publish`]: a topic with history is committed first
//!    ([`store::commit::GroupCommit::append`]: at once, or together with
//!    the publishes queued behind the commit in flight;
//!    [`store::Store::append`] assigns the offsets), and only then
//!    acknowledged; a topic without history is numbered by the relay.
//! 3. [`relay::Relay::publish`] sends the event to every node: straight
//!    back into this node's [`relay::Inbound`] (one node), or `PUBLISH`ed
//!    on its Redis channel and handed to each watching node's `Inbound` by
//!    that node's subscriber task.
//! 4. The topic's pipeline shard (`pipeline::Shard::arrive`) drops an
//!    offset already delivered, fills a gap from the store
//!    ([`store::Store::range`]), and offers the one `Arc<Event>` to each
//!    subscriber's [`mailbox::Mailbox`], which writes
//!    [`event::Event::ws_frame`] (encoded once per encoding, the same bytes
//!    for every subscriber) straight to the socket when nothing waits
//!    ahead of it, and queues it otherwise. It never waits: a full mailbox
//!    evicts its slow consumer.
//! 5. The connection's task (`ws::session`) wakes only when its socket
//!    pushed back, or when it held the events back while handling a
//!    client's message; it then writes what waits, through its
//!    [`mailbox::Outlet`].
//!
//! # The life of a subscription
//! `{"op":"subscribe"}` → [`broker::Broker::subscribe`] →
//! [`pipeline::Pipeline::subscribe`]: the shard has the relay watch the
//! topic, the head is read once the watch is in force, and the shard adds
//! the mailbox at the topic's position (the seam) → the session answers
//! `subscribed` with that offset, replays up to it from the store, and
//! everything after comes through the mailbox.
//!
//! # The life of a stream
//! `GET /api/v1/topics/{topic}/events` with `Accept: text/event-stream` (or
//! NDJSON), or `GET /api/v1/stream?topic=…` → `http::stream` checks the
//! token, topics and resume position, takes a connection slot and a held
//! [`mailbox::Mailbox`] (no socket: the stream takes every delivery
//! itself), and subscribes each topic as a WebSocket would → the response
//! body opens with each topic's position, replays what the resume asks
//! for, then writes what its mailbox holds as SSE messages or NDJSON lines,
//! with heartbeats, until overflow, expiry or shutdown ends it with an
//! `end` message, or the client leaves and the body is dropped.
//!
//! # The life of a connection
//! `GET /ws` with `Upgrade: websocket` leaves the HTTP dispatcher with its
//! socket (`ws::upgrade`) → origin, token and sub-protocol are checked
//! before the 101 → the connection's one task `select!`s over eviction and
//! shutdown, expiry, the heartbeat, its mailbox and client frames, writing
//! frames through the same queue as the pipeline's; a refused op becomes an error frame, and
//! every end is a [`ws::CloseCause`] → on exit it unsubscribes everything
//! (its drop guard does even after a panic) and sends the cause's close
//! frame.

pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dev;
pub mod event;
pub mod files;
pub mod http;
pub mod mailbox;
pub mod payload;
pub mod pipeline;
pub mod presence;
pub mod protocol;
pub mod rate;
pub mod registrations;
pub mod relay;
pub mod stall;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod topic;
pub mod ws;
