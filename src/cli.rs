//! The command line: `herald serve`, `herald token`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use serde_json::value::RawValue;

use crate::auth::{Signer, TokenLimits, TokenSpec, check_patterns, check_presence_info};
use crate::config::{ConfigError, Settings, TopicRule};
use crate::startup::Application;
use crate::store::Store;
use crate::{dev, telemetry};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Live-notification broker: HTTP publish, WebSocket subscribe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node.
    Serve {
        /// Settings file (TOML), layered over config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Zero-setup mode: create a development signing key if none is
        /// configured and print ready tokens.
        #[arg(long)]
        dev: bool,
        /// Address to listen on, e.g. 0.0.0.0:8080 or localhost:9000
        /// (overrides `server.bind`).
        #[arg(long)]
        bind: Option<String>,
    },
    /// Apply the event store's migrations (also done at every start-up).
    Migrate {
        /// Settings file (TOML), layered over config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a signed token for the configured key.
    Token {
        /// The token's subject (`sub`).
        #[arg(long)]
        sub: String,
        /// Patterns the token may subscribe to, comma-separated.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Patterns the token may publish to, comma-separated.
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
        /// Grant operator access (the `admin` claim: node and topic
        /// introspection).
        #[arg(long)]
        admin: bool,
        /// What other members see of this user in a topic's presence: a
        /// JSON object of at most 1 KiB, e.g. '{"name":"Ada"}' (the
        /// `presence_info` claim).
        #[arg(long)]
        presence_info: Option<String>,
        /// Limits for this `sub` that override the node's, for a backend's
        /// service token, e.g. http_publish_rate=50000,max_connections_per_sub=1000
        /// (keys: http_publish_rate, http_read_rate, max_connections_per_sub).
        #[arg(long, value_parser = TokenLimits::parse)]
        limits: Option<TokenLimits>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl, allow_hyphen_values = true)]
        ttl: Duration,
        /// Settings file (TOML), layered over config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Runs the command line; the binary's `main` is only this.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, dev, bind } => serve(config, dev, bind),
        Command::Migrate { config } => migrate(config),
        Command::Token {
            sub,
            topics,
            publish,
            admin,
            presence_info,
            limits,
            ttl,
            config,
        } => token(
            config,
            &TokenSpec {
                sub: &sub,
                topics: &topics,
                publish: &publish,
                admin,
                presence_info: None,
                limits: limits.unwrap_or_default(),
                ttl,
            },
            presence_info.as_deref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>, dev_mode: bool, bind: Option<String>) -> Result<(), String> {
    let mut settings = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(bind) = bind {
        crate::config::resolve(&bind).map_err(|e| format!("invalid --bind: {e}"))?;
        settings.server.bind = bind;
    }
    telemetry::init(settings.log.format);
    if dev_mode {
        settings.ui.enabled = true;
        // Presence everywhere, to try it: after the file's rules, which
        // still win for the topics they match.
        settings.topics.push(TopicRule {
            pattern: ">".into(),
            history: None,
            max_age: None,
            max_events: None,
            presence: Some(true),
        });
    }
    if dev_mode && dev::no_key_configured(&settings) {
        let path = &settings.dev.secret_file;
        let secret = dev::load_or_create_secret(path).map_err(|e| {
            format!(
                "cannot read or create the development key {} (setting `dev.secret_file`): {e}",
                path.display()
            )
        })?;
        settings.auth.jwt_secret = Some(secret);
    }
    node_system()?.block_on(async move {
        let app = Application::build(settings.clone())
            .await
            .map_err(|e| e.to_string())?;
        if dev_mode {
            let banner = dev::banner(&settings, app.local_addr())?;
            // A closed stdout (e.g. piped into `head`) must not stop the node.
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{banner}").and_then(|()| stdout.flush());
        }
        tracing::info!(addr = %app.local_addr(), "herald listening");
        app.run_until_stopped().await.map_err(|e| e.to_string())
    })
}

/// The runtime a node runs on. HTTP and WebSocket connections are served
/// by actix's workers, one thread and runtime each; what the node runs in
/// the background (the pipeline's shards, the relay, the committer, the
/// pruner) is spawned on this system's Tokio runtime, which is
/// multi-threaded so that the shards run on every core.
fn node_system() -> Result<actix_web::rt::SystemRunner, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("herald-core")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    Ok(actix_web::rt::System::with_tokio_rt(|| runtime))
}

fn migrate(config: Option<PathBuf>) -> Result<(), String> {
    let settings = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
    actix_web::rt::System::new().block_on(async move {
        let store = Store::open(&settings.store.url)
            .await
            .map_err(|e| e.to_string())?;
        println!("event store is up to date ({:?})", store.backend());
        Ok(())
    })
}

/// Prints the token `spec` describes, with `presence_info` (JSON text)
/// once checked.
fn token(
    config: Option<PathBuf>,
    spec: &TokenSpec<'_>,
    presence_info: Option<&str>,
) -> Result<(), String> {
    let &TokenSpec {
        sub,
        topics,
        publish,
        admin,
        ttl,
        ..
    } = spec;
    let info: Option<Box<RawValue>> = presence_info
        .map(|text| {
            let raw = serde_json::from_str::<Box<RawValue>>(text)
                .map_err(|e| format!("--presence-info is not JSON: {e}"))?;
            check_presence_info(&raw).map_err(|e| format!("--presence-info: {e}"))?;
            Ok::<_, String>(raw)
        })
        .transpose()?;
    let mut settings = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
    if dev::no_key_configured(&settings) {
        // Reuse the key `serve --dev` created, so its tokens verify.
        let path = &settings.dev.secret_file;
        settings.auth.jwt_secret = dev::existing_secret(path);
        if settings.auth.jwt_secret.is_none() {
            let here = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the current directory".into());
            return Err(format!(
                "no signing key: none is configured, and there is no development key at {} \
                 (setting `dev.secret_file`, relative to {here}). Run this where \
                 `herald serve --dev` runs, point HERALD__DEV__SECRET_FILE at its key, or \
                 configure the node's key (auth.jwt_secret / HERALD__AUTH__JWT_SECRET, or \
                 auth.private_key_pem for RS256/ES256) with --config or the environment",
                path.display()
            ));
        }
    }
    check_patterns("topics", topics).map_err(|e| e.to_string())?;
    check_patterns("publish", publish).map_err(|e| e.to_string())?;
    if sub.is_empty() {
        return Err("--sub must not be empty".into());
    }
    for warning in token_warnings(sub, topics, publish, admin, ttl) {
        eprintln!("warning: {warning}");
    }
    let signer = Signer::new(&settings.auth).map_err(|e: ConfigError| e.to_string())?;
    let token = signer
        .sign(&TokenSpec {
            presence_info: info.as_deref(),
            ..*spec
        })
        .map_err(|e| format!("cannot sign: {e}"))?;
    println!("{token}");
    Ok(())
}

/// Past this, `herald token` warns: a leaked token stays good until `exp`.
const LONG_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A token's lifetime from `--ttl`: a positive duration such as `30m`.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    const USAGE: &str = "give a positive duration such as 30m, 1h or 7d";
    if text.trim_start().starts_with('-') {
        return Err(format!("a token's lifetime cannot be negative; {USAGE}"));
    }
    let ttl = humantime::parse_duration(text).map_err(|e| format!("{e}; {USAGE}"))?;
    if ttl.is_zero() {
        return Err(format!(
            "a token with no lifetime is expired as soon as it is made; {USAGE}"
        ));
    }
    Ok(ttl)
}

/// What makes a token useless, said before it is printed (it is still
/// printed: a test may want exactly that token).
fn token_warnings(
    sub: &str,
    topics: &[String],
    publish: &[String],
    admin: bool,
    ttl: Duration,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if topics.is_empty() && publish.is_empty() && !admin {
        warnings.push(
            "the token grants nothing: it can connect but not subscribe or publish; \
             add --topics and/or --publish (e.g. --topics 'alerts.>')"
                .to_owned(),
        );
    }
    if ttl > LONG_TTL {
        warnings.push(format!(
            "--ttl {}: a token that lives longer than a week cannot be taken back \
             (Herald has no revocation); give browsers short tokens and refresh them",
            humantime::format_duration(ttl)
        ));
    }
    let uses_sub = topics
        .iter()
        .chain(publish)
        .any(|p| p.contains(crate::auth::SUB_PLACEHOLDER));
    if uses_sub && !crate::topic::is_valid_segment(sub) {
        warnings.push(format!(
            "grants using {{sub}} will match nothing: the sub {sub:?} has characters \
             outside [A-Za-z0-9_-], so it cannot stand in a topic (use an id like \
             \"alice\" or \"u-42\")"
        ));
    }
    warnings
}
