//! Zero-setup development mode: a generated signing key kept in a local file
//! (so restarts and `herald token` reuse it) and the start-up banner with
//! ready tokens and copy-paste examples.

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;

use crate::auth::{Signer, TokenLimits, TokenSpec};
use crate::config::{Algorithm, Settings};
use crate::files;

/// Lifetime of the tokens printed by the dev banner.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether the settings name no signing key at all.
pub fn no_key_configured(settings: &Settings) -> bool {
    settings.auth.algorithm == Algorithm::HS256 && settings.auth.jwt_secret.is_none()
}

/// Reads the development secret from `path`, creating it (mode 0600, in a
/// folder of mode 0700) with 32 random bytes when it does not exist yet.
pub fn load_or_create_secret(path: &Path) -> io::Result<SecretString> {
    match fs::read_to_string(path) {
        Ok(secret) => return Ok(SecretString::from(secret.trim().to_owned())),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir.exists() {
            files::make_dir_private(dir)?;
        } else {
            files::create_private_dir_all(dir)?;
        }
    }
    let secret: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    files::create_private_file(path)?.write_all(secret.as_bytes())?;
    Ok(SecretString::from(secret))
}

/// Reads an existing development secret, if `serve --dev` created one.
pub fn existing_secret(path: &Path) -> Option<SecretString> {
    fs::read_to_string(path)
        .ok()
        .map(|s| SecretString::from(s.trim().to_owned()))
}

/// The banner `serve --dev` prints on stdout once the node listens.
pub fn banner(settings: &Settings, addr: std::net::SocketAddr) -> Result<String, String> {
    // The command as the user can run it from here (e.g. target/release/herald).
    let program = std::env::args().next().unwrap_or_else(|| "herald".into());
    let signer = Signer::new(&settings.auth).map_err(|e| e.to_string())?;
    let all = vec![">".to_owned()];
    let subscriber = signer
        .sign(&TokenSpec {
            sub: "dev-subscriber",
            topics: &all,
            publish: &[],
            admin: false,
            presence_info: None,
            limits: TokenLimits::default(),
            ttl: DEV_TOKEN_TTL,
        })
        .map_err(|e| e.to_string())?;
    let publisher = signer
        .sign(&TokenSpec {
            sub: "dev-publisher",
            topics: &[],
            publish: &all,
            admin: false,
            presence_info: None,
            limits: TokenLimits::default(),
            ttl: DEV_TOKEN_TTL,
        })
        .map_err(|e| e.to_string())?;
    let console = signer
        .sign(&TokenSpec {
            sub: "dev-console",
            topics: &all,
            publish: &all,
            admin: false,
            presence_info: None,
            limits: TokenLimits::default(),
            ttl: DEV_TOKEN_TTL,
        })
        .map_err(|e| e.to_string())?;
    let secret_file = settings.dev.secret_file.display();
    Ok(format!(
        "\
Herald dev node listening on http://{addr}  (signing key: {secret_file})

Console (live events, publish from the browser):
  http://{addr}/#token={console}

Subscriber token (subscribe to any topic, 24h):
  {subscriber}

Publisher token (publish to any topic, 24h):
  {publisher}

Receive: open a WebSocket and subscribe, e.g. with npx wscat (or
python3 -m websockets, or websocat), then type the subscribe line:
  npx wscat -c 'ws://{addr}/ws?token={subscriber}'
  {{\"op\":\"subscribe\",\"id\":1,\"topic\":\"alerts\"}}
Or follow the topic as a plain HTTP stream, one JSON event per line:
  curl -N -H 'Accept: application/x-ndjson' \\
    -H 'Authorization: Bearer {subscriber}' \\
    http://{addr}/api/v1/topics/alerts/events

Publish (from another terminal):
  curl -i --json '{{\"text\":\"hello\"}}' \\
    -H 'Authorization: Bearer {publisher}' \\
    http://{addr}/api/v1/topics/alerts/events

More tokens: {program} token --sub alice --topics 'user.{{sub}}.>' --publish 'chat.>' --ttl 1h
"
    ))
}
