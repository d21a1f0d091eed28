//! Logging. `RUST_LOG` filters (default `info`); events go to stderr so that
//! stdout stays for what the user asked for (tokens, the dev banner).

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
