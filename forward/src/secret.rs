//! Secrets that must never reach logs: the Stripe API key and the webhook signing secret.
//!
//! Guarantee: `Debug` and `Display` of [`ApiKey`] and [`WebhookSecret`] print a fixed redaction,
//! never the value; the value is only reachable through `expose()`, used when building the
//! `Authorization` header or the HMAC.

use std::fmt;

/// A Stripe secret key (`sk_test_…`, `sk_live_…`, or a restricted `rk_…` key).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key, trimming surrounding whitespace (key files end with a newline).
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into().trim().to_owned())
    }

    /// Reads a key file (e.g. a mounted secret); surrounding whitespace is trimmed. The error
    /// names the path, never the content.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let key = Self::new(std::fs::read_to_string(path)?);
        if key.0.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is empty", path.display()),
            ));
        }
        Ok(key)
    }

    /// `STRIPE_API_KEY` if set and non-empty, else the key file if given, else `None`
    /// (log-only mode).
    pub fn from_env_or_file(path: Option<&std::path::Path>) -> std::io::Result<Option<Self>> {
        if let Ok(v) = std::env::var("STRIPE_API_KEY")
            && !v.trim().is_empty()
        {
            return Ok(Some(Self::new(v)));
        }
        path.map(Self::from_file).transpose()
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True for test-mode keys (`sk_test_`, `rk_test_`), which get the lower default rate limit.
    pub fn is_test_mode(&self) -> bool {
        self.0.starts_with("sk_test_") || self.0.starts_with("rk_test_")
    }

    /// A log-safe description: the mode only.
    pub fn mode(&self) -> &'static str {
        if self.is_test_mode() { "test" } else { "live" }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({} mode, redacted)", self.mode())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted {} key]", self.mode())
    }
}

/// A webhook endpoint signing secret (`whsec_…`).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// Wraps a secret, trimming surrounding whitespace.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into().trim().to_owned())
    }

    /// The secret itself, for the HMAC key only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(redacted)")
    }
}

impl fmt::Display for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted webhook secret]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_redacted_in_debug_and_display() {
        let k = ApiKey::new("sk_test_SECRETSECRET\n");
        assert_eq!(k.expose(), "sk_test_SECRETSECRET");
        for s in [format!("{k:?}"), format!("{k}"), format!("{:#?}", Some(&k))] {
            assert!(!s.contains("SECRET"), "{s}");
        }
        assert!(k.is_test_mode());
        assert!(!ApiKey::new("sk_live_x").is_test_mode());
        let w = WebhookSecret::new("whsec_SECRET");
        assert!(!format!("{w:?}{w}").contains("SECRET"));
    }
}
