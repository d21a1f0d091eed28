//! Settings: their defaults, layered loading and validation.
//!
//! Layers, later ones winning: built-in defaults, `config/default.toml` if
//! present, the `--config FILE` given on the command line, then environment
//! variables `HERALD__SECTION__KEY` (e.g. `HERALD__SERVER__BIND`). A setting
//! that cannot be used stops start-up with an error naming it. Secrets are
//! held as [`SecretString`] so they cannot be logged by accident.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

/// A setting that cannot be used, with the name of the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read settings: {0}")]
    Load(#[from] config::ConfigError),
    /// An unknown key, with where it was found (a file, or an environment
    /// variable), which the settings library leaves out.
    #[error("cannot read settings: {error} (in {origin})")]
    Unknown {
        error: config::ConfigError,
        origin: String,
    },
    #[error("invalid setting `{key}` (env {env}): {reason}")]
    Invalid {
        key: &'static str,
        env: &'static str,
        reason: String,
    },
    #[error(
        "no signing key configured: set `auth.jwt_secret` (env HERALD__AUTH__JWT_SECRET) for HS256, \
         or `auth.algorithm` with `auth.public_key_pem` for RS256/ES256; \
         or run `herald serve --dev` for a development key"
    )]
    NoKey,
}

impl ConfigError {
    pub(crate) fn invalid(key: &'static str, env: &'static str, reason: impl ToString) -> Self {
        ConfigError::Invalid {
            key,
            env,
            reason: reason.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub redis: RedisSettings,
    pub store: StoreSettings,
    pub retention: RetentionSettings,
    /// Per-pattern retention rules (`[[topics]]`), first match wins.
    #[serde(default)]
    pub topics: Vec<TopicRule>,
    pub ui: UiSettings,
    pub log: LogSettings,
    /// Every field is optional, hence a default section.
    #[serde(default)]
    pub metrics: MetricsSettings,
    pub presence: PresenceSettings,
    pub dev: DevSettings,
}

/// Presence: who is in a topic (topics opt in with `presence = true` in
/// their `[[topics]]` rule).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceSettings {
    /// A topic's joins and leaves are gathered this long and sent as one
    /// `presence_diff`; a join and a leave of one member within it cancel
    /// out.
    #[serde(deserialize_with = "duration")]
    pub batch_interval: Duration,
    /// A node that stops without leaving (killed, cut off from Redis) has
    /// its members leave within this long.
    #[serde(deserialize_with = "duration")]
    pub node_ttl: Duration,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `/metrics` on this address only (e.g. a private interface)
    /// instead of on `server.bind`.
    pub bind: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (human-readable) or `json` (one object per line).
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiSettings {
    /// Serve the live console page at `/` (always on with `serve --dev`).
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://FILE` (single node) or `postgres://…` (any node count).
    pub url: SecretString,
}

/// Defaults for topics that no `[[topics]]` rule matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Whether events are stored (and can be replayed).
    pub history: bool,
    /// Events older than this are pruned.
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// At most this many events are kept per topic.
    pub max_events: u64,
    /// How often old events are pruned.
    #[serde(deserialize_with = "duration")]
    pub prune_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    pub pattern: String,
    pub history: Option<bool>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub max_age: Option<Duration>,
    pub max_events: Option<u64>,
    /// Whether the topic keeps presence (who is in it); off by default.
    pub presence: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Setting it turns cluster mode on: events are relayed between nodes
    /// through this Redis. May hold a password, hence secret. With
    /// `mode = "cluster"`: one or more comma-separated seed nodes of a
    /// Redis Cluster.
    pub url: Option<SecretString>,
    /// What `url` points at: one Redis, or a Redis Cluster whose sharded
    /// pub/sub spreads topics over its masters.
    pub mode: RedisMode,
    /// Prefix of every Redis key and channel Herald uses, so deployments can
    /// share one Redis.
    pub prefix: String,
}

/// How Herald talks to Redis (`redis.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis (or a primary behind Sentinel's address): `PUBLISH` /
    /// `SUBSCRIBE`.
    Standalone,
    /// A Redis Cluster (Redis 7+): `SPUBLISH` / `SSUBSCRIBE` on a shard
    /// channel per topic, held on the master that owns its slot.
    Cluster,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the node listens on; port 0 picks a free port.
    pub bind: String,
    /// Browser origins allowed to open a WebSocket; empty allows any.
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_origins: Vec<String>,
    /// Time a client gets to send a request's head (the request line and
    /// headers, the WebSocket handshake included), from its first byte, on
    /// every request of a connection; past it, 408 and the connection
    /// closes.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Time a client gets to send a request's body once its head has
    /// arrived; past it, 408 and the connection closes.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// How often the node pings each WebSocket.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// A WebSocket silent for this long (no frame, no pong) is closed.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_timeout: Duration,
    /// An HTTP response or WebSocket frame the client does not take within
    /// this long is abandoned and the connection closed.
    #[serde(deserialize_with = "duration")]
    pub write_timeout: Duration,
}

/// JWT signing algorithms Herald accepts (one per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Algorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub algorithm: Algorithm,
    /// Shared secret for HS256.
    pub jwt_secret: Option<SecretString>,
    /// Verification key for RS256 / ES256 (PEM text).
    pub public_key_pem: Option<String>,
    /// Signing key for RS256 / ES256, used only by `herald token`.
    pub private_key_pem: Option<SecretString>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, on every path.
    #[serde(deserialize_with = "duration")]
    pub leeway: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest event payload (HTTP body or WebSocket frame), in bytes.
    pub max_payload_bytes: usize,
    /// Most events in one `POST /api/v1/events` batch.
    pub max_batch_events: usize,
    /// Largest `POST /api/v1/events` body, in bytes.
    pub max_batch_bytes: usize,
    /// Events queued for one connection before it is closed as too slow.
    pub outbound_queue: usize,
    /// Payload bytes queued for one connection before it is closed as too
    /// slow.
    pub outbound_queue_bytes: usize,
    /// WebSocket connections one node accepts; past it handshakes get 503.
    pub max_connections: usize,
    /// Topics one connection may subscribe to at once.
    pub max_subscriptions: usize,
    /// Payload bytes in one history page or one replay read, besides its
    /// event count (at least one event is always read).
    pub max_page_bytes: usize,
    /// WebSocket publishes per second per connection (also the burst).
    pub publish_rate: u32,
    /// WebSocket connections one user (token `sub`) may hold on a node.
    pub max_connections_per_sub: usize,
    /// HTTP-published events per second per user (token `sub`) on a node,
    /// also the burst; a batch counts its events.
    pub http_publish_rate: u32,
    /// WebSocket subscribe, unsubscribe and refresh ops per second per
    /// connection (also the burst).
    pub subscribe_rate: u32,
    /// HTTP reads (history, presence, introspection) per second per user
    /// (token `sub`) on a node, also the burst.
    pub http_read_rate: u32,
    /// Frames one WebSocket message may come in; past it the connection
    /// closes with 1008.
    pub max_fragments: usize,
    /// WebSocket control frames (ping, pong) per second per connection,
    /// also the burst; past it the connection closes with 1008.
    pub control_frame_rate: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevSettings {
    /// Where `serve --dev` keeps its generated HS256 secret.
    pub secret_file: PathBuf,
}

/// Longest of the `server.*` timeouts.
const MAX_SERVER_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Shortest `presence.node_ttl`: a node renews its lease six times per
/// TTL, and each renewal is a Redis round trip.
const MIN_NODE_TTL: Duration = Duration::from_secs(2);

/// The settings file read when present, before `--config` (no extension:
/// `config/default.toml`, or another format the settings library reads).
const DEFAULT_FILE: &str = "config/default";

/// Where an unknown key came from: the environment variable that sets it,
/// or the file that names it. The settings library says where a bad value
/// came from, but not an unknown key.
fn unknown_key_origin(error: &config::ConfigError, file: Option<&Path>) -> Option<String> {
    let text = error.to_string();
    let field = text.strip_prefix("unknown field `")?.split('`').next()?;
    // `for key `server``, `for key `topics[0]``, or none for a section.
    let section = text
        .split_once("for key `")
        .and_then(|(_, rest)| rest.split('`').next())
        .map(|key| key.split('[').next().unwrap_or(key));
    let variable = match section {
        Some(section) => format!("HERALD__{section}__{field}"),
        None => format!("HERALD__{field}__"),
    };
    let from_env = std::env::vars().map(|(name, _)| name).find(|name| {
        let (name, wanted) = (name.to_ascii_uppercase(), variable.to_ascii_uppercase());
        if section.is_some() {
            name == wanted
        } else {
            name.starts_with(&wanted)
        }
    });
    if let Some(name) = from_env {
        return Some(format!("the environment variable {name}"));
    }
    // A file layer: the one that names the field as a key.
    let files = file
        .map(Path::to_path_buf)
        .into_iter()
        .chain([PathBuf::from(format!("{DEFAULT_FILE}.toml"))]);
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let names = text.lines().any(|line| {
            let line = line.trim_start().trim_start_matches('[');
            line.strip_prefix(field)
                .is_some_and(|rest| rest.trim_start().starts_with(['=', ']', '.']))
        });
        if names {
            return Some(format!("the file {}", path.display()));
        }
    }
    None
}

/// Built-in defaults, the first layer. Every setting has one here, so the
/// README's settings table and this list can be compared line by line.
const DEFAULTS: &[(&str, &str)] = &[
    ("server.bind", "127.0.0.1:8080"),
    ("server.allowed_origins", ""),
    ("server.handshake_timeout", "5s"),
    ("server.body_timeout", "30s"),
    ("server.heartbeat_interval", "20s"),
    ("server.heartbeat_timeout", "60s"),
    ("server.write_timeout", "30s"),
    ("auth.algorithm", "HS256"),
    ("auth.leeway", "5s"),
    ("limits.max_payload_bytes", "65536"),
    ("limits.max_batch_events", "1000"),
    ("limits.max_batch_bytes", "1048576"),
    ("limits.outbound_queue", "1024"),
    ("limits.outbound_queue_bytes", "8388608"),
    ("limits.max_connections", "10000"),
    ("limits.max_subscriptions", "100"),
    ("limits.max_page_bytes", "1048576"),
    ("limits.publish_rate", "100"),
    ("limits.max_connections_per_sub", "100"),
    ("limits.http_publish_rate", "1000"),
    ("limits.subscribe_rate", "100"),
    ("limits.http_read_rate", "100"),
    ("limits.max_fragments", "64"),
    ("limits.control_frame_rate", "10"),
    ("redis.prefix", "herald:"),
    ("redis.mode", "standalone"),
    ("store.url", "sqlite://.herald/herald.db"),
    ("retention.history", "true"),
    ("retention.max_age", "24h"),
    ("retention.max_events", "10000"),
    ("retention.prune_interval", "1m"),
    ("presence.batch_interval", "200ms"),
    ("presence.node_ttl", "15s"),
    ("ui.enabled", "false"),
    ("log.format", "text"),
    ("dev.secret_file", ".herald/dev-secret"),
];

impl Settings {
    /// Loads the layers described in the module doc.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder = Self::defaults_builder()?
            .add_source(config::File::with_name(DEFAULT_FILE).required(false));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("HERALD")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()?
            .try_deserialize()
            .map_err(|error| match unknown_key_origin(&error, file) {
                Some(origin) => ConfigError::Unknown { error, origin },
                None => ConfigError::Load(error),
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// The built-in defaults alone, ignoring files and the environment
    /// (what tests start from).
    pub fn defaults() -> Settings {
        Self::defaults_builder()
            .and_then(|b| b.build())
            .and_then(|c| c.try_deserialize())
            // The defaults are constants checked by the unit test below.
            .expect("built-in defaults deserialize")
    }

    fn defaults_builder()
    -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS {
            builder = builder.set_default(*key, *value)?;
        }
        Ok(builder)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        self.metrics_addr()?;
        for origin in &self.server.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                return Err(ConfigError::invalid(
                    "server.allowed_origins",
                    "HERALD__SERVER__ALLOWED_ORIGINS",
                    format!("{origin:?} is not an origin like https://app.example.com"),
                ));
            }
        }
        let positive = [
            (
                self.limits.max_payload_bytes,
                "limits.max_payload_bytes",
                "HERALD__LIMITS__MAX_PAYLOAD_BYTES",
            ),
            (
                self.limits.max_batch_events,
                "limits.max_batch_events",
                "HERALD__LIMITS__MAX_BATCH_EVENTS",
            ),
            (
                self.limits.max_batch_bytes,
                "limits.max_batch_bytes",
                "HERALD__LIMITS__MAX_BATCH_BYTES",
            ),
            (
                self.limits.outbound_queue,
                "limits.outbound_queue",
                "HERALD__LIMITS__OUTBOUND_QUEUE",
            ),
            (
                self.limits.outbound_queue_bytes,
                "limits.outbound_queue_bytes",
                "HERALD__LIMITS__OUTBOUND_QUEUE_BYTES",
            ),
            (
                self.limits.max_connections,
                "limits.max_connections",
                "HERALD__LIMITS__MAX_CONNECTIONS",
            ),
            (
                self.limits.max_subscriptions,
                "limits.max_subscriptions",
                "HERALD__LIMITS__MAX_SUBSCRIPTIONS",
            ),
            (
                self.limits.max_page_bytes,
                "limits.max_page_bytes",
                "HERALD__LIMITS__MAX_PAGE_BYTES",
            ),
            (
                self.limits.publish_rate as usize,
                "limits.publish_rate",
                "HERALD__LIMITS__PUBLISH_RATE",
            ),
            (
                self.limits.max_connections_per_sub,
                "limits.max_connections_per_sub",
                "HERALD__LIMITS__MAX_CONNECTIONS_PER_SUB",
            ),
            (
                self.limits.http_publish_rate as usize,
                "limits.http_publish_rate",
                "HERALD__LIMITS__HTTP_PUBLISH_RATE",
            ),
            (
                self.limits.subscribe_rate as usize,
                "limits.subscribe_rate",
                "HERALD__LIMITS__SUBSCRIBE_RATE",
            ),
            (
                self.limits.http_read_rate as usize,
                "limits.http_read_rate",
                "HERALD__LIMITS__HTTP_READ_RATE",
            ),
            (
                self.limits.max_fragments,
                "limits.max_fragments",
                "HERALD__LIMITS__MAX_FRAGMENTS",
            ),
            (
                self.limits.control_frame_rate as usize,
                "limits.control_frame_rate",
                "HERALD__LIMITS__CONTROL_FRAME_RATE",
            ),
        ];
        let server = &self.server;
        for (value, key, env) in [
            (
                server.handshake_timeout,
                "server.handshake_timeout",
                "HERALD__SERVER__HANDSHAKE_TIMEOUT",
            ),
            (
                server.body_timeout,
                "server.body_timeout",
                "HERALD__SERVER__BODY_TIMEOUT",
            ),
            (
                server.heartbeat_interval,
                "server.heartbeat_interval",
                "HERALD__SERVER__HEARTBEAT_INTERVAL",
            ),
            (
                server.heartbeat_timeout,
                "server.heartbeat_timeout",
                "HERALD__SERVER__HEARTBEAT_TIMEOUT",
            ),
            (
                server.write_timeout,
                "server.write_timeout",
                "HERALD__SERVER__WRITE_TIMEOUT",
            ),
        ] {
            // Bounded: a deadline is an instant this far ahead, which must
            // exist.
            if value.is_zero() || value > MAX_SERVER_TIMEOUT {
                return Err(ConfigError::invalid(
                    key,
                    env,
                    "must be greater than 0 and at most 1 day",
                ));
            }
        }
        let presence = &self.presence;
        if presence.batch_interval.is_zero() || presence.batch_interval > Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "presence.batch_interval",
                "HERALD__PRESENCE__BATCH_INTERVAL",
                "must be greater than 0 and at most 10s",
            ));
        }
        if presence.node_ttl < MIN_NODE_TTL || presence.node_ttl < 5 * presence.batch_interval {
            return Err(ConfigError::invalid(
                "presence.node_ttl",
                "HERALD__PRESENCE__NODE_TTL",
                "must be at least 2s and at least 5 times presence.batch_interval",
            ));
        }
        if server.heartbeat_timeout <= server.heartbeat_interval {
            return Err(ConfigError::invalid(
                "server.heartbeat_timeout",
                "HERALD__SERVER__HEARTBEAT_TIMEOUT",
                "must be longer than server.heartbeat_interval",
            ));
        }
        if self.retention.prune_interval.is_zero() {
            return Err(ConfigError::invalid(
                "retention.prune_interval",
                "HERALD__RETENTION__PRUNE_INTERVAL",
                "must be greater than 0",
            ));
        }
        let prefix = &self.redis.prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b))
        {
            return Err(ConfigError::invalid(
                "redis.prefix",
                "HERALD__REDIS__PREFIX",
                "must be 1-64 characters of [A-Za-z0-9_-:.]",
            ));
        }
        if self.redis.mode == RedisMode::Cluster {
            if self.redis.url.is_none() {
                return Err(ConfigError::invalid(
                    "redis.url",
                    "HERALD__REDIS__URL",
                    "redis.mode = \"cluster\" needs the cluster's seed nodes in redis.url \
                     (e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379)",
                ));
            }
            if let Some(rule) = self.topics.iter().find(|r| r.presence == Some(true)) {
                return Err(ConfigError::invalid(
                    "topics.presence",
                    "HERALD__TOPICS",
                    format!(
                        "presence (on the rule for {:?}) is not available with \
                         redis.mode = \"cluster\" yet; remove `presence = true` or use one Redis",
                        rule.pattern
                    ),
                ));
            }
        }
        for (value, key, env) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, env, "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// The separate metrics address, when one is set.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.metrics
            .bind
            .as_deref()
            .map(|bind| {
                resolve(bind)
                    .map_err(|e| ConfigError::invalid("metrics.bind", "HERALD__METRICS__BIND", e))
            })
            .transpose()
    }

    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        resolve(&self.server.bind)
            .map_err(|e| ConfigError::invalid("server.bind", "HERALD__SERVER__BIND", e))
    }
}

/// An address to listen on: `IP:PORT` (`127.0.0.1:8080`, `[::1]:8080`,
/// `0.0.0.0:8080`) or `HOST:PORT` (`localhost:8080`), a host name taking
/// its first resolved address.
pub fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs as _;
    let usage = "use IP:PORT (e.g. 127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080) or HOST:PORT";
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{text:?} resolves to no address; {usage}")),
        Err(e) => Err(format!("{text:?} is not an address ({e}); {usage}")),
    }
}

/// Accepts `["a", "b"]` in files and `a,b` in environment variables.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Reads a duration written like `90s`, `15m`, `24h`, `7d`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s = Settings::defaults();
        s.validate().unwrap();
        assert_eq!(s.bind_addr().unwrap().to_string(), "127.0.0.1:8080");
        assert!(s.server.allowed_origins.is_empty());
        assert_eq!(s.auth.algorithm, Algorithm::HS256);
    }

    #[test]
    fn bind_takes_host_names() {
        let mut s = Settings::defaults();
        s.server.bind = "localhost:8090".into();
        let addr = s.bind_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() == 8090, "{addr}");
    }

    #[test]
    fn bad_bind_names_the_setting() {
        let mut s = Settings::defaults();
        s.server.bind = "nowhere".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("server.bind"), "{err}");
        assert!(err.contains("HERALD__SERVER__BIND"), "{err}");
    }
}
