//! A token's own limits: the `limits` claim, which overrides the node's
//! per-user limits for the token's `sub` (a backend's service token), and
//! `herald token --limits`.

use super::AuthError;

/// What a token's `limits` claim may set for its own `sub`, overriding the
/// node's `limits.*` for that user: a backend's service token may publish
/// far more than a browser user. Only a token the node verifies can carry
/// them, so only its key's holder can grant them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenLimits {
    /// `limits.http_publish_rate` for this `sub`.
    pub http_publish_rate: Option<u32>,
    /// `limits.http_read_rate` for this `sub`.
    pub http_read_rate: Option<u32>,
    /// `limits.max_connections_per_sub` for this `sub`.
    pub max_connections_per_sub: Option<u32>,
}

impl TokenLimits {
    /// The keys a token may set, as in the settings (`limits.<key>`).
    pub const KEYS: &[&str] = &[
        "http_publish_rate",
        "http_read_rate",
        "max_connections_per_sub",
    ];

    fn slot(&mut self, key: &str) -> Option<&mut Option<u32>> {
        match key {
            "http_publish_rate" => Some(&mut self.http_publish_rate),
            "http_read_rate" => Some(&mut self.http_read_rate),
            "max_connections_per_sub" => Some(&mut self.max_connections_per_sub),
            _ => None,
        }
    }

    /// Sets `key` to `value` (a positive integer), or says why not.
    pub fn set(&mut self, key: &str, value: u64) -> Result<(), String> {
        let keys = Self::KEYS.join(", ");
        let slot = self
            .slot(key)
            .ok_or_else(|| format!("unknown limit `{key}`; a token may set {keys}"))?;
        match u32::try_from(value) {
            Ok(v) if v > 0 => {
                *slot = Some(v);
                Ok(())
            }
            _ => Err(format!(
                "`{key}` must be a whole number from 1 to {}",
                u32::MAX
            )),
        }
    }

    /// Reads the `limits` claim.
    pub(super) fn from_claim(
        claim: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, AuthError> {
        let mut limits = TokenLimits::default();
        for (key, value) in claim {
            let value = value
                .as_u64()
                .ok_or_else(|| AuthError::BadLimits(format!("`{key}` must be a whole number")))?;
            limits.set(key, value).map_err(AuthError::BadLimits)?;
        }
        Ok(limits)
    }

    /// Reads `key=value,key=value` (`herald token --limits`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut limits = TokenLimits::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let value = value
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("`{}` must be a whole number", key.trim()))?;
            limits.set(key.trim(), value)?;
        }
        Ok(limits)
    }

    /// The `limits` claim, when any is set.
    pub(super) fn to_claim(self) -> Option<serde_json::Map<String, serde_json::Value>> {
        let set = [
            ("http_publish_rate", self.http_publish_rate),
            ("http_read_rate", self.http_read_rate),
            ("max_connections_per_sub", self.max_connections_per_sub),
        ];
        let claim: serde_json::Map<_, _> = set
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_owned(), value?.into())))
            .collect();
        (!claim.is_empty()).then_some(claim)
    }
}
