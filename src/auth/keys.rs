//! What a node takes as its signing key: secrets it refuses (published in
//! Herald's own files, placeholders, or too uniform to be secret), and what
//! a PEM key setting must hold.

use crate::config::Algorithm;

/// Signing secrets that appeared as defaults or examples in Herald's own
/// files (compose file, scripts, docs). Anyone can read them, so a node
/// started with one is refused; so is any secret still saying "change me".
const PUBLISHED_SECRETS: &[&str] = &["local-cluster-secret-change-me-0123456789"];

/// Whether `secret` is one of [`PUBLISHED_SECRETS`] or an unedited
/// placeholder.
pub fn is_published_secret(secret: &str) -> bool {
    let folded: String = secret
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    PUBLISHED_SECRETS.contains(&secret) || folded.contains("changeme")
}

/// Whether `secret` is made of one repeated character, or of one class of
/// characters only (digits, lowercase or uppercase letters): such a secret
/// is guessed long before its length suggests.
pub fn is_weak_secret(secret: &str) -> bool {
    let bytes = secret.as_bytes();
    let one_class = |class: fn(&u8) -> bool| bytes.iter().all(class);
    bytes.windows(2).all(|w| w[0] == w[1])
        || one_class(u8::is_ascii_digit)
        || one_class(u8::is_ascii_lowercase)
        || one_class(u8::is_ascii_uppercase)
}

/// What a PEM key setting must hold for `algorithm`, said when it does not.
pub(super) fn expected_pem(algorithm: Algorithm, private: bool) -> &'static str {
    match (algorithm, private) {
        (Algorithm::RS256, false) => {
            "an RSA public key in PEM (`-----BEGIN PUBLIC KEY-----` or \
             `-----BEGIN RSA PUBLIC KEY-----`), the whole text with its line breaks"
        }
        (Algorithm::RS256, true) => {
            "an RSA private key in PEM (`-----BEGIN PRIVATE KEY-----` or \
             `-----BEGIN RSA PRIVATE KEY-----`), the whole text with its line breaks"
        }
        (_, false) => {
            "an EC P-256 public key in PEM (`-----BEGIN PUBLIC KEY-----`), the whole text \
             with its line breaks"
        }
        (_, true) => {
            "an EC P-256 private key in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`; convert \
             a `BEGIN EC PRIVATE KEY` with `openssl pkcs8 -topk8 -nocrypt`)"
        }
    }
}
