//! Request routing and authentication.

use hyper::body::Incoming;
use hyper::{Method, StatusCode};

use super::{ApiError, Gateway, Response, full};
use crate::auth::{self, Principal, TokenHash};

/// A request as routed: the parts handlers read, and the body.
pub type Request = hyper::Request<Incoming>;

impl Gateway {
    /// Answers one request; every failure becomes a JSON error.
    pub(super) async fn route(&self, request: Request) -> Response {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let response = self.dispatch(request).await;
        let response = response.unwrap_or_else(ApiError::into_response);
        tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
        response
    }

    async fn dispatch(&self, request: Request) -> Result<Response, ApiError> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = request.method().clone();
        match (segments.as_slice(), &method) {
            (["healthz"], &Method::GET) => {
                Ok(json(StatusCode::OK, serde_json::json!({"status": "ok"})))
            }
            (["readyz"], &Method::GET) => Ok(self.readiness()),
            (["metrics"], &Method::GET) => self.metrics_text(&request).await,
            (["fn", tenant, function, ..], _) => {
                let rest = rest_of_path(&path, 3);
                self.invoke(request, tenant, function, rest).await
            }
            // The OpenAI-compatible API at the base URL clients of other
            // servers use (`http://host:port/v1`), besides `/openai/v1`;
            // `/v1/models` answers in both shapes (control.rs).
            (["v1", "chat", "completions"] | ["v1", "completions"] | ["v1", "embeddings"], _) => {
                self.openai(request, &segments, &method).await
            }
            (["v1", "functions", _, "logs"], &Method::GET) => {
                // `?follow=true` streams for as long as the client reads.
                self.control(request, &segments[1..], &method).await
            }
            (["v1", ..], _) => {
                let limit = self.config.control_timeout;
                tokio::time::timeout(limit, self.control(request, &segments[1..], &method))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "deadline_exceeded",
                            format!("the request did not finish within {} s", limit.as_secs()),
                        ))
                    })
            }
            (["openai", ..], _) => self.openai(request, &segments[1..], &method).await,
            _ => Err(ApiError::not_found(format!("no route for {method} {path}"))),
        }
    }

    /// Who the request's bearer token belongs to.
    pub(super) async fn authenticate(&self, request: &Request) -> Result<Principal, ApiError> {
        let header = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing `Authorization: Bearer <key>` header")
            })?;
        let token = header.to_str().ok().and_then(auth::bearer).ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <key>`")
        })?;
        let hash = TokenHash::of(token);
        if hash.matches(&self.admin_token) {
            return Ok(Principal::Admin);
        }
        match self.store.key(&hash).await? {
            Some(key) => Ok(Principal::Tenant(key.tenant)),
            None => Err(ApiError::unauthorized("unknown API key")),
        }
    }

    /// The operator only.
    pub(super) async fn require_admin(&self, request: &Request) -> Result<(), ApiError> {
        match self.authenticate(request).await? {
            Principal::Admin => Ok(()),
            Principal::Tenant(_) => Err(ApiError::forbidden("this needs the admin token")),
        }
    }

    /// A tenant key; returns the tenant.
    pub(super) async fn require_tenant(&self, request: &Request) -> Result<String, ApiError> {
        match self.authenticate(request).await? {
            Principal::Tenant(tenant) => Ok(tenant),
            Principal::Admin => Err(ApiError::forbidden(
                "the admin token is not a tenant key: create a key with `gigafactory tenant key <tenant>`",
            )),
        }
    }

    async fn metrics_text(&self, request: &Request) -> Result<Response, ApiError> {
        self.require_admin(request).await?;
        let text = self.metrics.render(
            self.runtime.counters(),
            self.runtime.models(),
            self.functions.len(),
        );
        Ok(hyper::Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(full(text))
            .expect("a valid response"))
    }
}

/// The path after the first `skip` segments, with its leading slash
/// (`/fn/a/b/x/y` → `/x/y`; `/fn/a/b` → `/`).
fn rest_of_path(path: &str, skip: usize) -> String {
    let rest: Vec<&str> = path.trim_start_matches('/').splitn(skip + 1, '/').collect();
    format!("/{}", rest.get(skip).copied().unwrap_or(""))
}

/// A JSON response.
pub(super) fn json(status: StatusCode, value: serde_json::Value) -> Response {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(value.to_string()))
        .expect("a valid response")
}

/// Checks a tenant or function name: 1–63 of `a-z0-9-`, starting and
/// ending alphanumeric (so no `..`, no `/`, no percent-escapes).
pub(super) fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    check_name_of(kind, name, b"-")
}

/// Checks a model name: as [`check_name`], with `.` and `_` too (`qwen2.5-0.5b`).
pub(super) fn check_model_name(name: &str) -> Result<(), ApiError> {
    check_name_of("model", name, b"-._")
}

/// 1–63 of `a-z0-9` and `punctuation`, starting and ending alphanumeric.
fn check_name_of(kind: &str, name: &str, punctuation: &[u8]) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || punctuation.contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        let allowed: Vec<String> = punctuation
            .iter()
            .map(|b| format!("'{}'", *b as char))
            .collect();
        Err(ApiError::bad_request(
            "invalid_name",
            format!(
                "invalid {kind} name {name:?}: use 1-63 of a-z, 0-9 and {}, starting and ending with a letter or digit",
                allowed.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_of_path_keeps_the_tail() {
        assert_eq!(rest_of_path("/fn/a/b/x/y", 3), "/x/y");
        assert_eq!(rest_of_path("/fn/a/b/", 3), "/");
        assert_eq!(rest_of_path("/fn/a/b", 3), "/");
    }

    #[test]
    fn names_are_strict() {
        assert!(check_name("function", "embed-v2").is_ok());
        for bad in ["", "..", "%2e%2e", "A", "-x", "x-", "a/b", &"a".repeat(64)] {
            assert!(check_name("function", bad).is_err(), "{bad:?} accepted");
        }
    }
}
