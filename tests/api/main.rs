//! Black-box tests: each starts a real node on a random port and talks to it
//! over real WebSocket and HTTP connections.

mod auth;
mod browser;
mod cli;
mod cluster;
mod deploy;
mod durability;
mod examples;
mod helpers;
mod hostile;
mod http;
mod js_client;
mod operations;
mod presence;
mod reads;
mod regressions;
mod sharded;
mod slow;
mod streams;
mod testenv;
mod transport;
mod trust;
mod ws;
