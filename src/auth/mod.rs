//! Authentication: JWT verification and signing, claims and the grants they
//! carry.
//!
//! A token is verified with the one algorithm and key the node is configured
//! with (so `alg: none` and algorithm confusion are refused by construction),
//! `exp` and `sub` are required, and so are `iss` / `aud` when the node
//! names an issuer or audience; a header with `crit` is refused (Herald
//! understands no extension). A verified token becomes [`Grants`]: the
//! patterns its holder may subscribe and publish to, with `{sub}` already
//! substituted, and the limits its `limits` claim sets (`limits.rs`). Which
//! keys a node refuses is in `keys.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{Algorithm, AuthSettings, ConfigError};
use crate::topic::{Pattern, Topic, is_valid_segment};

mod keys;
mod limits;

use keys::expected_pem;
pub use keys::{is_published_secret, is_weak_secret};
pub use limits::TokenLimits;

/// The placeholder in a grant pattern that stands for the token's `sub`.
pub const SUB_PLACEHOLDER: &str = "{sub}";

/// Why a token was refused. The message never contains the token itself.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <jwt>` or the `token` query parameter")]
    Missing,
    /// On routes that take the token from the header only.
    #[error("missing token: send `Authorization: Bearer <jwt>`")]
    MissingBearer,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm is not the one this node accepts")]
    WrongAlgorithm,
    #[error("token issuer (iss) is not accepted")]
    WrongIssuer,
    #[error("token audience (aud) is not accepted")]
    WrongAudience,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("token claim `sub` is {0} bytes; at most {MAX_SUB_BYTES} are accepted")]
    SubTooLong(usize),
    #[error(
        "token header lists critical extensions (crit) this node does not understand (RFC 7515 §4.1.11)"
    )]
    CriticalExtension,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error(
        "token claim `presence_info` must be a JSON object of at most {MAX_PRESENCE_INFO} bytes: {0}"
    )]
    BadPresenceInfo(String),
    #[error("token claim `limits`: {0}")]
    BadLimits(String),
    #[error("token grants an invalid pattern {pattern:?} in `{claim}`: {reason}")]
    BadGrant {
        claim: &'static str,
        pattern: String,
        reason: String,
    },
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm
            }
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            ErrorKind::InvalidToken => AuthError::Malformed("not a JWT".into()),
            ErrorKind::Base64(_) => AuthError::Malformed("bad base64".into()),
            ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                AuthError::Malformed("header or claims are not valid".into())
            }
            ErrorKind::Utf8(_) => AuthError::Malformed("not UTF-8".into()),
            _ => AuthError::Malformed("cannot be verified".into()),
        }
    }
}

/// The claims Herald reads from (and writes into) a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    // Defaults only let jsonwebtoken's own required-claim check (`exp`,
    // `sub`) run and name the missing claim; both are always required.
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// One audience or several (RFC 7519 §4.1.3); the node's
    /// `auth.audience` must be one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Patterns the holder may subscribe to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Patterns the holder may publish to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Operator access: node and topic introspection for every topic.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// What other members see of the holder in a topic's presence (e.g.
    /// its name and avatar): a JSON object of at most
    /// [`MAX_PRESENCE_INFO`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_info: Option<Box<RawValue>>,
    /// Limits for the holder's `sub` that override the node's, keyed like
    /// the settings (see [`TokenLimits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Longest `sub` a token may carry, in bytes of UTF-8: it names the user in
/// presence, limits and logs, and a presence page's cursor carries one.
pub const MAX_SUB_BYTES: usize = 256;

// A cursor (the last `sub` of a page, base64url) always fits what a client
// may send back.
const _: () = assert!(MAX_SUB_BYTES.div_ceil(3) * 4 <= crate::protocol::MAX_CURSOR_BYTES);

/// Largest `presence_info` claim, in bytes of JSON text.
pub const MAX_PRESENCE_INFO: usize = 1024;

/// The `aud` claim: a string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Longest a connection's token is taken to live (ten years); `exp` beyond
/// it is treated as this.
const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grants {
    pub sub: String,
    /// Unix seconds at which the token expires (its `exp`).
    pub exp: u64,
    /// Unix seconds until which the token is accepted: `exp` plus
    /// `auth.leeway`, the one rule for every path (HTTP, handshake, a
    /// connection's life, a replay).
    pub valid_until: u64,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    /// The `admin` claim: introspection of the node and of every topic.
    pub admin: bool,
    /// Some grant used `{sub}` but `sub` is not a valid topic segment, so
    /// that grant matches nothing. Kept to explain refusals.
    sub_unusable: bool,
    /// The `presence_info` claim, checked: JSON text of an object.
    pub presence_info: Option<Arc<str>>,
    /// The `limits` claim: the node's limits this token overrides.
    pub limits: TokenLimits,
}

/// Which right a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

/// A refused subscribe or publish, with a message saying why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Forbidden {
    message: String,
    /// The topic refused, when a topic was.
    topic: Option<Topic>,
}

impl Forbidden {
    pub fn new(message: impl Into<String>) -> Forbidden {
        Forbidden {
            message: message.into(),
            topic: None,
        }
    }

    /// The topic refused, when a topic was.
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref()
    }
}

impl Grants {
    /// When the token stops being accepted (`valid_until`), on the
    /// runtime's clock: where a connection or stream holding it ends.
    pub fn expires_at(&self) -> tokio::time::Instant {
        // Capped: an issuer's far-future `exp` must not overflow the clock.
        let left = std::time::Duration::from_secs(
            self.valid_until
                .saturating_sub(unix_now_secs())
                .min(MAX_TOKEN_LIFETIME_SECS),
        );
        tokio::time::Instant::now() + left
    }

    fn from_claims(claims: Claims) -> Result<Grants, AuthError> {
        if claims.sub.is_empty() {
            return Err(AuthError::MissingClaim("sub".into()));
        }
        if claims.sub.len() > MAX_SUB_BYTES {
            return Err(AuthError::SubTooLong(claims.sub.len()));
        }
        let mut sub_unusable = false;
        let mut parse = |claim: &'static str, patterns: &[String]| {
            let mut out = Vec::with_capacity(patterns.len());
            for raw in patterns {
                let text = if raw.contains(SUB_PLACEHOLDER) {
                    if !is_valid_segment(&claims.sub) {
                        sub_unusable = true;
                        continue;
                    }
                    raw.replace(SUB_PLACEHOLDER, &claims.sub)
                } else {
                    raw.clone()
                };
                out.push(Pattern::parse(&text).map_err(|e| AuthError::BadGrant {
                    claim,
                    pattern: raw.clone(),
                    reason: e.to_string(),
                })?);
            }
            Ok::<_, AuthError>(out)
        };
        let subscribe = parse("topics", &claims.topics)?;
        let publish = parse("publish", &claims.publish)?;
        let presence_info = claims
            .presence_info
            .map(|info| check_presence_info(&info).map(|()| Arc::from(info.get())))
            .transpose()?;
        let limits = claims
            .limits
            .as_ref()
            .map(TokenLimits::from_claim)
            .transpose()?
            .unwrap_or_default();
        Ok(Grants {
            presence_info,
            limits,
            sub: claims.sub,
            exp: claims.exp,
            valid_until: claims.exp,
            admin: claims.admin,
            subscribe,
            publish,
            sub_unusable,
        })
    }

    /// Whether these grants allow `action` on `topic`, and if not, why.
    pub fn check(&self, action: Action, topic: &Topic) -> Result<(), Forbidden> {
        let (patterns, verb, claim) = match action {
            Action::Subscribe => (&self.subscribe, "subscribe to", "topics"),
            Action::Publish => (&self.publish, "publish to", "publish"),
        };
        if patterns.iter().any(|p| p.matches(topic)) {
            return Ok(());
        }
        let mut msg = format!("token does not allow to {verb} \"{topic}\" (claim `{claim}`)");
        if self.sub_unusable {
            msg.push_str(
                "; grants using {sub} match nothing because the token's sub contains \
                 characters outside [A-Za-z0-9_-]",
            );
        }
        Err(Forbidden {
            message: msg,
            topic: Some(topic.clone()),
        })
    }
}

/// Checks a `presence_info` claim: a JSON object, small, and one both
/// encodings can carry.
pub fn check_presence_info(info: &RawValue) -> Result<(), AuthError> {
    let text = info.get();
    if text.len() > MAX_PRESENCE_INFO {
        return Err(AuthError::BadPresenceInfo(format!(
            "it is {} bytes",
            text.len()
        )));
    }
    if !text.starts_with('{') {
        return Err(AuthError::BadPresenceInfo("it is not an object".into()));
    }
    crate::payload::check_json(text).map_err(|e| AuthError::BadPresenceInfo(e.to_string()))
}

fn jwt_algorithm(a: Algorithm) -> jsonwebtoken::Algorithm {
    match a {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
    }
}

/// Verifies tokens against the node's configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(auth: &AuthSettings) -> Result<Verifier, ConfigError> {
        let key = match auth.algorithm {
            Algorithm::HS256 => {
                let secret = auth.jwt_secret.as_ref().ok_or(ConfigError::NoKey)?;
                let secret = secret.expose_secret();
                if secret.len() < 32 {
                    return Err(ConfigError::invalid(
                        "auth.jwt_secret",
                        "HERALD__AUTH__JWT_SECRET",
                        "must be at least 32 bytes for HS256",
                    ));
                }
                if is_published_secret(secret) {
                    return Err(ConfigError::invalid(
                        "auth.jwt_secret",
                        "HERALD__AUTH__JWT_SECRET",
                        "this secret is published in Herald's own files, so anyone could sign \
                         tokens (admin included) for this node; choose your own, e.g. \
                         `openssl rand -base64 32`",
                    ));
                }
                if is_weak_secret(secret) {
                    return Err(ConfigError::invalid(
                        "auth.jwt_secret",
                        "HERALD__AUTH__JWT_SECRET",
                        "is one repeated character or one class of characters (only digits, \
                         only lowercase or only uppercase letters), which is guessed easily; \
                         choose a random one, e.g. `openssl rand -base64 32`",
                    ));
                }
                DecodingKey::from_secret(secret.as_bytes())
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                let pem = auth.public_key_pem.as_ref().ok_or(ConfigError::NoKey)?;
                let parsed = if auth.algorithm == Algorithm::RS256 {
                    DecodingKey::from_rsa_pem(pem.as_bytes())
                } else {
                    DecodingKey::from_ec_pem(pem.as_bytes())
                };
                parsed.map_err(|e| {
                    ConfigError::invalid(
                        "auth.public_key_pem",
                        "HERALD__AUTH__PUBLIC_KEY_PEM",
                        format!("{e}: expected {}", expected_pem(auth.algorithm, false)),
                    )
                })?
            }
        };
        let mut validation = Validation::new(jwt_algorithm(auth.algorithm));
        validation.leeway = auth.leeway.as_secs();
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not only checked
        // when present: jsonwebtoken skips an absent claim.
        let mut required = vec!["exp", "sub"];
        required.extend(auth.issuer.as_ref().map(|_| "iss"));
        required.extend(auth.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &auth.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &auth.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Verifier { key, validation })
    }

    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        if data.header.crit.is_some() {
            return Err(AuthError::CriticalExtension);
        }
        // jsonwebtoken's required-claim check refuses these already; this
        // holds the rule where Herald reads the claims, whatever that
        // library's check does in a later version.
        let claims = &data.claims;
        if self.validation.iss.is_some() && claims.iss.is_none() {
            return Err(AuthError::MissingClaim("iss".into()));
        }
        if self.validation.aud.is_some() && claims.aud.is_none() {
            return Err(AuthError::MissingClaim("aud".into()));
        }
        let mut grants = Grants::from_claims(data.claims)?;
        grants.valid_until = grants.exp.saturating_add(self.validation.leeway);
        Ok(grants)
    }
}

/// What a token [`Signer::sign`] makes says.
#[derive(Debug, Clone, Copy)]
pub struct TokenSpec<'a> {
    pub sub: &'a str,
    /// Patterns it may subscribe to.
    pub topics: &'a [String],
    /// Patterns it may publish to.
    pub publish: &'a [String],
    pub admin: bool,
    pub presence_info: Option<&'a RawValue>,
    /// The node's limits it overrides for its `sub`.
    pub limits: TokenLimits,
    /// How long it is valid.
    pub ttl: Duration,
}

/// Signs tokens with the node's configured key (`herald token`, dev mode).
pub struct Signer {
    key: EncodingKey,
    header: Header,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Signer {
    pub fn new(auth: &AuthSettings) -> Result<Signer, ConfigError> {
        let key = match auth.algorithm {
            Algorithm::HS256 => {
                let secret = auth.jwt_secret.as_ref().ok_or(ConfigError::NoKey)?;
                EncodingKey::from_secret(secret.expose_secret().as_bytes())
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                let pem = auth.private_key_pem.as_ref().ok_or_else(|| {
                    ConfigError::invalid(
                        "auth.private_key_pem",
                        "HERALD__AUTH__PRIVATE_KEY_PEM",
                        "needed to sign tokens with RS256/ES256",
                    )
                })?;
                let pem = pem.expose_secret().as_bytes();
                let parsed = if auth.algorithm == Algorithm::RS256 {
                    EncodingKey::from_rsa_pem(pem)
                } else {
                    EncodingKey::from_ec_pem(pem)
                };
                parsed.map_err(|e| {
                    ConfigError::invalid(
                        "auth.private_key_pem",
                        "HERALD__AUTH__PRIVATE_KEY_PEM",
                        format!("{e}: expected {}", expected_pem(auth.algorithm, true)),
                    )
                })?
            }
        };
        Ok(Signer {
            key,
            header: Header::new(jwt_algorithm(auth.algorithm)),
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
        })
    }

    /// A token as `spec` describes it.
    pub fn sign(&self, spec: &TokenSpec<'_>) -> Result<String, jsonwebtoken::errors::Error> {
        let now = unix_now_secs();
        let claims = Claims {
            sub: spec.sub.to_owned(),
            exp: now + spec.ttl.as_secs(),
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(Audience::One),
            topics: spec.topics.to_vec(),
            publish: spec.publish.to_vec(),
            admin: spec.admin,
            presence_info: spec.presence_info.map(ToOwned::to_owned),
            limits: spec.limits.to_claim(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
    }
}

/// Checks grant patterns given on the command line before signing them.
pub fn check_patterns(claim: &'static str, patterns: &[String]) -> Result<(), AuthError> {
    let mut seen = HashSet::new();
    for raw in patterns {
        if !seen.insert(raw) {
            continue;
        }
        // `{sub}` is substituted at verification; check the rest of the shape.
        Pattern::parse(&raw.replace(SUB_PLACEHOLDER, "x")).map_err(|e| AuthError::BadGrant {
            claim,
            pattern: raw.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

pub fn unix_now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(sub: &str, topics: &[&str], publish: &[&str]) -> Grants {
        Grants::from_claims(Claims {
            sub: sub.into(),
            exp: 0,
            iat: None,
            iss: None,
            aud: None,
            topics: topics.iter().map(|s| s.to_string()).collect(),
            publish: publish.iter().map(|s| s.to_string()).collect(),
            admin: false,
            presence_info: None,
            limits: None,
        })
        .unwrap()
    }

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn sub_placeholder_is_substituted() {
        let g = grants("alice", &["user.{sub}.>"], &[]);
        assert!(g.check(Action::Subscribe, &t("user.alice.inbox")).is_ok());
        assert!(g.check(Action::Subscribe, &t("user.bob.inbox")).is_err());
        assert!(g.check(Action::Publish, &t("user.alice.inbox")).is_err());
    }

    #[test]
    fn unusable_sub_voids_the_grant_and_says_why() {
        let g = grants("alice@example.com", &["user.{sub}", "news"], &[]);
        assert!(g.check(Action::Subscribe, &t("news")).is_ok());
        let err = g
            .check(Action::Subscribe, &t("user.alice"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("{sub}"), "{err}");
    }

    #[test]
    fn bad_grant_pattern_refuses_the_token() {
        let claims = Claims {
            sub: "a".into(),
            exp: 0,
            iat: None,
            iss: None,
            aud: None,
            topics: vec!["a..b".into()],
            publish: vec![],
            admin: false,
            presence_info: None,
            limits: None,
        };
        assert!(matches!(
            Grants::from_claims(claims),
            Err(AuthError::BadGrant { .. })
        ));
    }
}
