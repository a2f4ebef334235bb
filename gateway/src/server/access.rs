//! Around every request: its id (`x-request-id`, kept when the client
//! sends one), the in-flight counts, and, once its response body has ended
//! or been dropped, the access log line and the HTTP metrics.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::MatchedPath;
use axum::middleware::Next;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::HeaderValue;
use tower::ServiceExt as _;
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Instrument as _;

use super::routes::Request;
use super::{Body, Gateway, Response};
use crate::auth::Principal;

/// The response header (and request header, when a client sends one)
/// carrying the request's id.
pub const REQUEST_ID: &str = "x-request-id";

/// What the handlers learn of a request that its log line reports: who
/// sent it and which route answered.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Learned>>);

tokio::task_local! {
    /// The request the task is answering.
    static SEEN: Seen;
}

/// Records the caller of the request being answered, for its log line.
pub(super) fn authenticated(principal: &Principal) {
    let _ = SEEN.try_with(|seen| seen.principal(principal));
}

/// Bills the request being answered to `tenant`'s usage (its requests
/// and bytes): a call of its function or of the OpenAI-compatible API
/// that this node answers or forwards (not one a peer forwarded here,
/// which the peer bills).
pub(super) fn bill(tenant: &str) {
    let _ = SEEN.try_with(|seen| {
        seen.0.lock().unwrap_or_else(|e| e.into_inner()).billed = Some(tenant.to_string());
    });
}

#[derive(Default)]
struct Learned {
    who: Option<String>,
    route: Option<MatchedPath>,
    billed: Option<String>,
}

impl Seen {
    /// Records the authenticated caller (`admin` or the tenant's name).
    fn principal(&self, principal: &Principal) {
        let who = match principal {
            Principal::Admin => "admin".to_string(),
            Principal::Tenant(tenant) => tenant.clone(),
        };
        self.0.lock().unwrap_or_else(|e| e.into_inner()).who = Some(who);
    }

    fn route(&self, route: &MatchedPath) {
        // A shared template: cloned without copying it.
        self.0.lock().unwrap_or_else(|e| e.into_inner()).route = Some(route.clone());
    }

    fn learned(&self) -> Learned {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Middleware on every route: records the route's template (`/fn/{tenant}/{function}`).
pub(super) async fn matched_route(request: Request, next: Next) -> Response {
    if let Some(matched) = request.extensions().get::<MatchedPath>() {
        let _ = SEEN.try_with(|seen| seen.route(matched));
    }
    next.run(request).await
}

/// Request ids: 16 random hex digits.
#[derive(Clone, Copy, Default)]
pub(super) struct RequestIds;

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &hyper::Request<B>) -> Option<RequestId> {
        let mut bytes = [0u8; 8];
        // Without randomness the id is only less unique.
        let _ = getrandom::fill(&mut bytes);
        HeaderValue::from_str(&hex::encode(bytes))
            .ok()
            .map(RequestId::new)
    }
}

/// Whether a client's request id is one to keep: 1–64 of `A-Za-z0-9-_.:`.
fn plain_id(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// The application as a connection serves it: ids, CORS and routes.
pub(super) type App = tower::util::BoxCloneSyncService<hyper::Request<Body>, Response, Infallible>;

/// What is known of a request when it arrives.
pub(super) struct Arrival {
    pub method: hyper::Method,
    pub path: String,
    pub started: Instant,
}

impl Gateway {
    /// Answers one request through `app`; the response body carries
    /// `holds` (in-flight counters) and writes the log line when it ends.
    pub(super) async fn answer(
        self: Arc<Self>,
        app: App,
        mut request: hyper::Request<Body>,
        holds: impl Send + Sync + 'static,
    ) -> Response {
        // The id is made here (tower-http's layer keeps it) so that the
        // request's span, and every line logged under it, carries it.
        // A client's own id is kept when it is a plain token of at most
        // 64 characters; anything else is replaced (it goes into every
        // log line of the request).
        let acceptable = request
            .headers()
            .get(REQUEST_ID)
            .is_some_and(|id| plain_id(id.as_bytes()));
        if !acceptable && let Some(id) = RequestIds.make_request_id(&request) {
            request
                .headers_mut()
                .insert(REQUEST_ID, id.into_header_value());
        }
        let id = request
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let arrival = Arrival {
            method: request.method().clone(),
            path: request.uri().path().to_string(),
            started: Instant::now(),
        };
        let received = Arc::new(AtomicU64::new(0));
        let counting = received.clone();
        let request = request.map(|body| {
            Body::new(body.map_frame(move |frame: Frame<Bytes>| {
                if let Some(data) = frame.data_ref() {
                    counting.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                frame
            }))
        });
        let seen = Seen::default();
        let span = tracing::info_span!("request", request_id = %id, method = %arrival.method, path = %arrival.path);
        let answered = SEEN.scope(seen.clone(), app.oneshot(request).instrument(span));
        let response = match answered.await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let head = arrival.started.elapsed();
        let ending = Arc::new(Ending {
            gateway: self,
            arrival,
            status: response.status().as_u16(),
            id,
            seen,
            head,
            bytes: AtomicU64::new(0),
            received,
            failed: AtomicBool::new(false),
            _holds: Box::new(holds),
        });
        let (counting, failing) = (ending.clone(), ending);
        response.map(move |body| {
            Body::new(
                body.map_err(move |error| {
                    failing.failed.store(true, Ordering::Relaxed);
                    error
                })
                .map_frame(move |frame: Frame<Bytes>| {
                    if let Some(data) = frame.data_ref() {
                        counting
                            .bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    frame
                }),
            )
        })
    }
}

/// A request whose response is being sent; logged and counted when dropped.
struct Ending {
    gateway: Arc<Gateway>,
    arrival: Arrival,
    status: u16,
    id: String,
    seen: Seen,
    /// Time to the response head.
    head: Duration,
    /// Body bytes sent.
    bytes: AtomicU64,
    /// Request body bytes read.
    received: Arc<AtomicU64>,
    /// Whether the body ended in an error (cut off).
    failed: AtomicBool,
    _holds: Box<dyn Send + Sync>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let Learned { who, route, billed } = self.seen.learned();
        let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let Arrival {
            method,
            path,
            started,
        } = &self.arrival;
        self.gateway
            .metrics
            .http_request(route, method, self.status, self.head);
        let total = started.elapsed();
        let bytes = self.bytes.load(Ordering::Relaxed);
        let cut = self.failed.load(Ordering::Relaxed);
        let received = self.received.load(Ordering::Relaxed);
        // Not a request refused by the tenant's quota (429) or for want of
        // capacity (503): those did no work for it.
        if let Some(tenant) = billed.filter(|_| !matches!(self.status, 429 | 503)) {
            self.gateway.usage.record(&tenant, |used| {
                used.requests += 1;
                used.bytes_in += received;
                used.bytes_out += bytes;
            });
        }
        let who = who.as_deref().unwrap_or("-");
        let head_ms = self.head.as_secs_f64() * 1e3;
        let total_ms = total.as_secs_f64() * 1e3;
        // Probes would drown the log.
        if matches!(route, "/healthz" | "/readyz" | "/metrics") {
            tracing::debug!(target: "gigafactory::access", request_id = %self.id, %method, %path, status = self.status, "probe");
        } else {
            tracing::info!(
                target: "gigafactory::access",
                request_id = %self.id,
                tenant = %who,
                %method,
                %path,
                route,
                status = self.status,
                bytes,
                received,
                head_ms,
                total_ms,
                cut,
                "request"
            );
        }
    }
}
