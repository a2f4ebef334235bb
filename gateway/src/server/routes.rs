//! The route table (axum): which handler answers which method and path,
//! JSON 404/405 (with `Allow`) for the rest, and the authentication every
//! handler starts with.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::{any, get, post, put};
use hyper::HeaderMap;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode, Uri};
use serde::de::DeserializeOwned;

use super::operations::UsageQuery;
use super::{ApiError, Gateway, Response, full};
use crate::auth::{self, Principal, TokenHash};

/// A request as routed: the parts handlers read, and the body.
pub type Request = axum::extract::Request;

/// The gateway, as handlers receive it.
type Shared = State<Arc<Gateway>>;

/// Path parameters (all names of things); one that does not decode is a
/// JSON 400 `invalid_name`.
pub(super) struct Params<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(params)) => Ok(Self(params)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_name",
                format!("invalid path: {}", rejection.body_text()),
            )),
        }
    }
}

/// A query string; one that does not decode is a JSON 400 `invalid_query`
/// naming what was wrong.
pub(super) struct Query<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(query)) => Ok(Self(query)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

#[derive(serde::Deserialize)]
struct FunctionPath {
    tenant: String,
    function: String,
}

impl Gateway {
    /// Every route of the API.
    pub(super) fn router(self: &Arc<Self>) -> Router {
        // Control-plane calls end at the control timeout; log follows and
        // generations have their own limits.
        let control = Router::new()
            .route(
                "/v1/whoami",
                get(|State(gw): Shared, headers: HeaderMap| async move { gw.whoami(&headers).await }),
            )
            .route(
                "/v1/tenants",
                get(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.list_tenants(&headers).await
                })
                .post(|State(gw): Shared, request: Request| async move {
                    gw.create_tenant(request).await
                }),
            )
            .route(
                "/v1/tenants/{tenant}",
                get(
                    |State(gw): Shared, Params(tenant): Params<String>, headers: HeaderMap| async move {
                        gw.get_tenant(&headers, &tenant).await
                    },
                )
                .delete(
                    |State(gw): Shared, Params(tenant): Params<String>, headers: HeaderMap| async move {
                        gw.delete_tenant(&headers, &tenant).await
                    },
                ),
            )
            .route(
                "/v1/tenants/{tenant}/quota",
                put(
                    |State(gw): Shared, Params(tenant): Params<String>, request: Request| async move {
                        gw.set_quota(request, &tenant).await
                    },
                ),
            )
            .route(
                "/v1/tenants/{tenant}/keys",
                get(
                    |State(gw): Shared, Params(tenant): Params<String>, headers: HeaderMap| async move {
                        gw.list_keys(&headers, &tenant).await
                    },
                )
                .post(
                    |State(gw): Shared, Params(tenant): Params<String>, headers: HeaderMap| async move {
                        gw.create_key(&headers, &tenant).await
                    },
                ),
            )
            .route(
                "/v1/tenants/{tenant}/keys/{id}",
                axum::routing::delete(
                    |State(gw): Shared,
                     Params((tenant, id)): Params<(String, String)>,
                     headers: HeaderMap| async move {
                        gw.revoke_key(&headers, &tenant, &id).await
                    },
                ),
            )
            .route(
                "/v1/functions",
                get(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.list_functions(&headers).await
                }),
            )
            .route(
                "/v1/functions/{name}",
                put(
                    |State(gw): Shared, Params(name): Params<String>, request: Request| async move {
                        gw.deploy(request, &name).await
                    },
                )
                .get(
                    |State(gw): Shared, Params(name): Params<String>, headers: HeaderMap| async move {
                        gw.get_function(&headers, &name).await
                    },
                )
                .delete(
                    |State(gw): Shared, Params(name): Params<String>, headers: HeaderMap| async move {
                        gw.delete_function(&headers, &name).await
                    },
                ),
            )
            .route(
                "/v1/functions/{name}/active",
                put(
                    |State(gw): Shared, Params(name): Params<String>, request: Request| async move {
                        gw.activate_function(request, &name).await
                    },
                ),
            )
            .route(
                "/v1/models",
                get(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.list_models(&headers).await
                })
                .post(|State(gw): Shared, request: Request| async move {
                    gw.put_model(request, None).await
                }),
            )
            .route(
                "/v1/models/{name}",
                get(
                    |State(gw): Shared, Params(name): Params<String>, headers: HeaderMap| async move {
                        gw.show_model(&headers, &name).await
                    },
                )
                .put(
                    |State(gw): Shared, Params(name): Params<String>, request: Request| async move {
                        gw.put_model(request, Some(&name)).await
                    },
                )
                .delete(
                    |State(gw): Shared, Params(name): Params<String>,
                     uri: Uri,
                     headers: HeaderMap| async move {
                        gw.remove_model(&headers, &name, flag(&uri, "force")).await
                    },
                ),
            )
            .route(
                "/v1/model-files/{sha256}",
                put(
                    |State(gw): Shared, Params(sha256): Params<String>, request: Request| async move {
                        gw.begin_upload(request, &sha256).await
                    },
                )
                .get(
                    |State(gw): Shared, Params(sha256): Params<String>, headers: HeaderMap| async move {
                        gw.upload_state(&headers, &sha256).await
                    },
                ),
            )
            .route(
                "/v1/model-files/{sha256}/parts/{index}",
                put(
                    |State(gw): Shared,
                     Params((sha256, index)): Params<(String, String)>,
                     request: Request| async move {
                        gw.upload_part(request, &sha256, &index).await
                    },
                ),
            )
            .route(
                "/v1/repository/rescan",
                post(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.rescan(&headers).await
                }),
            )
            .route(
                "/v1/devices",
                get(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.list_devices(&headers).await
                }),
            )
            .route(
                "/v1/nodes",
                get(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.list_nodes(&headers).await
                }),
            )
            .route(
                "/v1/usage",
                get(
                    |State(gw): Shared, Query(query): Query<UsageQuery>, headers: HeaderMap| async move {
                        gw.usage_report(&headers, query).await
                    },
                ),
            )
            .route_layer(middleware::from_fn_with_state(self.clone(), control_deadline));
        // The OpenAI-compatible API at `/openai/v1` and at the base URL
        // clients of other servers use (`http://host:port/v1`); `/v1/models`
        // answers in both shapes (control.rs).
        let openai = Router::new()
            .route(
                "/openai/v1/models",
                get(|State(gw): Shared, headers: HeaderMap| async move {
                    gw.openai_models(&headers).await
                }),
            )
            .route(
                "/openai/v1/models/{id}",
                get(
                    |State(gw): Shared, Params(id): Params<String>, headers: HeaderMap| async move {
                        gw.openai_model(&headers, &id).await
                    },
                ),
            );
        let mut router =
            Router::new()
                .route("/healthz", get(healthz))
                .route("/console", get(super::console::root))
                .route("/console/", get(|| super::console::file(None)))
                .route(
                    "/console/{file}",
                    get(|Params(file): Params<String>| async move {
                        super::console::file(Some(&file)).await
                    }),
                )
                .route(
                    "/readyz",
                    get(|State(gw): Shared| async move { gw.readiness().await }),
                )
                .route(
                    "/metrics",
                    get(|State(gw): Shared, headers: HeaderMap| async move {
                        gw.metrics_text(&headers).await
                    }),
                )
                // Long: as long as the store takes to write.
                .route(
                    "/v1/backup",
                    get(|State(gw): Shared, headers: HeaderMap| async move {
                        gw.backup(&headers).await
                    }),
                )
                .route("/fn/{tenant}/{function}", any(invoke))
                .route("/fn/{tenant}/{function}/", any(invoke))
                .route("/fn/{tenant}/{function}/{*rest}", any(invoke))
                .route(
                    "/v1/functions/{name}/logs",
                    get(
                        |State(gw): Shared,
                         Params(name): Params<String>,
                         uri: Uri,
                         headers: HeaderMap| async move {
                            gw.function_logs(&headers, &name, flag(&uri, "follow"))
                                .await
                        },
                    ),
                )
                .merge(control)
                .merge(openai);
        for prefix in ["/v1", "/openai/v1"] {
            router = router
                .route(
                    &format!("{prefix}/chat/completions"),
                    post(chat_completions),
                )
                .route(&format!("{prefix}/completions"), post(completions))
                .route(&format!("{prefix}/embeddings"), post(embeddings));
        }
        router
            .fallback(no_route)
            .method_not_allowed_fallback(method_not_allowed)
            .route_layer(middleware::from_fn(super::access::matched_route))
            .layer(middleware::from_fn_with_state(
                self.clone(),
                refuse_while_draining,
            ))
            .with_state(self.clone())
    }

    /// Who the request's bearer token belongs to.
    pub(super) async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let header = headers.get(hyper::header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("missing `Authorization: Bearer <key>` header")
        })?;
        let token = header.to_str().ok().and_then(auth::bearer).ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <key>`")
        })?;
        let hash = TokenHash::of(token);
        let principal = if hash.matches(&self.admin_token) {
            Principal::Admin
        } else {
            match self.store.key(&hash).await? {
                Some(key) => Principal::Tenant(key.tenant),
                None => return Err(ApiError::unauthorized("unknown API key")),
            }
        };
        super::access::authenticated(&principal);
        Ok(principal)
    }

    /// The operator only.
    pub(super) async fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.authenticate(headers).await? {
            Principal::Admin => Ok(()),
            Principal::Tenant(_) => Err(ApiError::forbidden("this needs the admin token")),
        }
    }

    /// The operator, or a key of `tenant` itself (a tenant manages its own keys).
    pub(super) async fn require_admin_or(
        &self,
        headers: &HeaderMap,
        tenant: &str,
    ) -> Result<(), ApiError> {
        match self.authenticate(headers).await? {
            Principal::Admin => Ok(()),
            Principal::Tenant(own) if own == tenant => Ok(()),
            Principal::Tenant(_) => Err(ApiError::forbidden(
                "a key may manage only the keys of its own tenant",
            )),
        }
    }

    /// A tenant key; returns the tenant.
    pub(super) async fn require_tenant(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        match self.authenticate(headers).await? {
            Principal::Tenant(tenant) => Ok(tenant),
            Principal::Admin => Err(ApiError::forbidden(
                "the admin token is not a tenant key: create a key with `gigafactory tenant key <tenant>`",
            )),
        }
    }

    /// `/metrics`: for the admin token, or the metrics token when one is set.
    async fn metrics_text(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        let metrics_token = self.config.metrics_token.as_deref().map(TokenHash::of);
        let presented = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer)
            .map(TokenHash::of);
        let reader = matches!((&metrics_token, &presented), (Some(allowed), Some(presented)) if presented.matches(allowed));
        if !reader {
            self.require_admin(headers).await?;
        }
        let text = self.metrics.render(
            self.runtime.counters(),
            self.runtime.models(),
            self.functions.len(),
        );
        Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
    }
}

/// The path after the first `skip` segments, with its leading slash
/// (`/fn/a/b/x/y` → `/x/y`; `/fn/a/b` → `/`).
fn rest_of_path(path: &str, skip: usize) -> String {
    let rest: Vec<&str> = path.trim_start_matches('/').splitn(skip + 1, '/').collect();
    format!("/{}", rest.get(skip).copied().unwrap_or(""))
}

async fn healthz() -> Response {
    json(StatusCode::OK, serde_json::json!({"status": "ok"}))
}

/// `/fn/{tenant}/{function}/{*path}`: the function sees the path below its mount point.
async fn invoke(
    State(gw): Shared,
    Params(path): Params<FunctionPath>,
    request: Request,
) -> Result<Response, ApiError> {
    let rest = rest_of_path(request.uri().path(), 3);
    gw.invoke(request, &path.tenant, &path.function, rest).await
}

async fn chat_completions(State(gw): Shared, request: Request) -> Result<Response, ApiError> {
    gw.chat_completions(request).await
}

async fn completions(State(gw): Shared, request: Request) -> Result<Response, ApiError> {
    gw.completions(request).await
}

async fn embeddings(State(gw): Shared, request: Request) -> Result<Response, ApiError> {
    gw.embeddings(request).await
}

/// While the node drains, new requests other than probes get 503 with
/// Retry-After (and HTTP/1 connections close), so clients retry elsewhere.
async fn refuse_while_draining(State(gw): Shared, request: Request, next: Next) -> Response {
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    if probe || !gw.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return next.run(request).await;
    }
    let mut refusal = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "draining",
        "this node is shutting down and takes no new requests; retry shortly",
    )
    .retry_after(1)
    .into_response();
    if request.version() < hyper::Version::HTTP_2 {
        refusal.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    refusal
}

/// Ends a control-plane call at the control timeout.
async fn control_deadline(State(gw): Shared, request: Request, next: Next) -> Response {
    let limit = gw.config.control_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "deadline_exceeded",
            format!("the request did not finish within {} s", limit.as_secs()),
        )
        .into_response(),
    }
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// 405; axum adds the `Allow` header.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Whether the query sets `name` (`?name=true` or `?name=1`).
fn flag(uri: &Uri, name: &str) -> bool {
    uri.query().unwrap_or("").split('&').any(|pair| {
        pair.split_once('=')
            .is_some_and(|(key, value)| key == name && matches!(value, "true" | "1"))
    })
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
