//! A small client for the gateway's HTTP API.

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Talks to one gateway with one token.
pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
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
    /// A client for the gateway at `url` (http only).
    pub fn new(url: &str, token: Option<String>) -> Result<Self> {
        if !url.starts_with("http://") {
            bail!("the gateway URL must start with http:// (got {url:?})");
        }
        Ok(Self {
            base: url.trim_end_matches('/').to_string(),
            token,
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
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
        let url = format!("{}{path}", self.base);
        let mut builder = hyper::Request::builder().method(method.clone()).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = match body {
            Some((content_type, bytes)) => {
                builder = builder.header("content-type", content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .context("building the request")?;
        let response =
            self.http.request(request).await.with_context(|| {
                format!("{method} {url}: is `gigafactory serve` running there?")
            })?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .with_context(|| format!("reading the response of {method} {url}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GETs `path` and hands each line of the streamed body to `line`
    /// as it arrives, until the server ends the response.
    pub async fn follow_lines(&self, path: &str, mut line: impl FnMut(&str)) -> Result<()> {
        let url = format!("{}{path}", self.base);
        let mut builder = hyper::Request::get(&url);
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .context("building the request")?;
        let response = self
            .http
            .request(request)
            .await
            .with_context(|| format!("GET {url}: is `gigafactory serve` running there?"))?;
        let (parts, mut body) = response.into_parts();
        if !parts.status.is_success() {
            let body = body.collect().await?.to_bytes();
            let reply = Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            };
            bail!("GET {path}: {}", describe_error(&reply));
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.context("reading the stream")?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
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
