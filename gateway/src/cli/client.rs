//! The client for the gateway's HTTP API (reqwest on rustls), shared by
//! the CLI, the benchmarks and the tests.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::header::HeaderMap;
use reqwest::{Certificate, Method, StatusCode};

/// Talks to one gateway with one token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// A whole response.
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Client {
    /// A client for the gateway at `url` (`http://` or `https://`, the
    /// server's certificate checked against the system's roots).
    pub fn new(url: &str, token: Option<String>) -> Result<Self> {
        Self::with_ca(url, token, None)
    }

    /// As [`Client::new`], also trusting the PEM certificates in `ca`
    /// (a private CA, or a self-signed server certificate).
    pub fn with_ca(url: &str, token: Option<String>, ca: Option<&Path>) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("the gateway URL must start with http:// or https:// (got {url:?})");
        }
        // One process-wide TLS provider: ring, which rustls builds with here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("gigafactory/", env!("CARGO_PKG_VERSION")))
            // A function's redirect is its answer, shown as it is.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            let certificates = Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{}: not PEM certificates", ca.display()))?;
            if certificates.is_empty() {
                bail!("{}: holds no PEM certificate", ca.display());
            }
            builder = builder.tls_certs_merge(certificates);
        }
        Ok(Self {
            base: url.trim_end_matches('/').to_string(),
            token,
            http: builder.build().context("setting up the HTTP client")?,
        })
    }

    /// Sends a request; the response's head, its body still to read.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        headers: &[(String, String)],
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some((content_type, bytes)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        request.send().await.map_err(|error| {
            let hint = if error.is_connect() {
                ": is `gigafactory serve` running there?"
            } else {
                ""
            };
            anyhow::Error::new(error).context(format!("{method} {url}{hint}"))
        })
    }

    /// Sends a request and reads the whole response.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        headers: &[(String, String)],
    ) -> Result<Reply> {
        let response = self.open(method.clone(), path, body, headers).await?;
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response
            .bytes()
            .await
            .with_context(|| format!("reading the response of {method} {path}"))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// GETs `path` and hands each line of the streamed body to `line`
    /// as it arrives, until the server ends the response.
    pub async fn follow_lines(&self, path: &str, mut line: impl FnMut(&str)) -> Result<()> {
        let response = self.open(Method::GET, path, None, &[]).await?;
        if !response.status().is_success() {
            let reply = Reply {
                status: response.status(),
                headers: response.headers().clone(),
                body: response.bytes().await.unwrap_or_default(),
            };
            bail!("GET {path}: {}", describe_error(&reply));
        }
        let mut chunks = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = chunks.next().await {
            pending.extend_from_slice(&chunk.context("reading the stream")?);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let text: Vec<u8> = pending.drain(..=end).collect();
                line(String::from_utf8_lossy(&text).trim_end());
            }
        }
        Ok(())
    }

    /// Calls the JSON API; a non-2xx answer becomes an error with the
    /// server's message.
    pub async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<serde_json::Value> {
        let reply = self.send(method.clone(), path, body, &[]).await?;
        if !reply.status.is_success() {
            bail!("{method} {path}: {}", describe_error(&reply));
        }
        if reply.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&reply.body).context("the gateway answered with invalid JSON")
    }
}

/// `404 Not Found: no function "x" (not_found)` from an error reply.
pub fn describe_error(reply: &Reply) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&reply.body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    match error {
        Some(error) => format!(
            "{}: {} ({})",
            reply.status,
            error["message"].as_str().unwrap_or("?"),
            error["code"].as_str().unwrap_or("?")
        ),
        None => format!("{}: {}", reply.status, String::from_utf8_lossy(&reply.body)),
    }
}
