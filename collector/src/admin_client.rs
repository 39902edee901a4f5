//! A small client of the admin API, for the CLI commands that act on a running collector
//! (`tally-collector enroll-token …`): the collector holds its store open, so they go through
//! the API with the admin token, as an operator's script would, and get the same answers and
//! the same errors.

use std::time::Duration;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The base URL is not an `http://` or `https://` URL.
    #[error("admin API URL {0:?}: expected http://host:port")]
    Url(String),
    /// The request did not get an answer.
    #[error("cannot reach the admin API at {url}: {source} (is the collector running?)")]
    Transport {
        /// The URL called.
        url: String,
        /// What failed.
        source: reqwest::Error,
    },
    /// The API answered with an error (its Stripe-style body).
    #[error("{status} {code}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error's code.
        code: String,
        /// The error's message.
        message: String,
    },
    /// The answer was not JSON.
    #[error("the admin API answered {status} with a body that is not JSON")]
    Decode {
        /// The HTTP status.
        status: u16,
    },
}

/// A client of one collector's admin API.
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish()
    }
}

impl AdminClient {
    /// A client of the API at `base_url` (e.g. `http://127.0.0.1:7080`) using `token`.
    pub fn new(base_url: &str, token: &str) -> Result<Self, AdminClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(AdminClientError::Url(base));
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| AdminClientError::Transport {
                url: base.clone(),
                source,
            })?;
        Ok(AdminClient {
            base,
            token: token.trim().to_owned(),
            http,
        })
    }

    /// Calls `method path` with an optional JSON body; the answer's JSON, or the API's error.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AdminClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let transport = |source| AdminClientError::Transport {
            url: url.clone(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(transport)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| AdminClientError::Decode { status })?;
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let field = |k: &str| v["error"][k].as_str().unwrap_or_default().to_owned();
        Err(AdminClientError::Api {
            status,
            code: field("code"),
            message: field("message"),
        })
    }
}
