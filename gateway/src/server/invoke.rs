//! The data plane: `/fn/{tenant}/{function}/{*path}` runs the function's
//! active version with the request streamed through, under the limits and
//! grants of its manifest.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gigafactory_runtime::logs::LogLimits;
use gigafactory_runtime::{
    AiService, Capabilities, ComputeBudget, CutOff, Invocation, InvokeError, ModelAccess,
    OutboundAccess,
};
use hyper::StatusCode;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, HOST, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::bodies::{LimitedRequest, LimitedResponse};
use super::control::drain;
use super::error::incident_id;
use super::routes::{Request, check_name};
use super::{ApiError, Gateway, Response};
use crate::quota::Quota;
use crate::store::Version;

/// Response header naming the version that answered.
pub const VERSION_HEADER: &str = "gigafactory-function-version";

/// Memory a tenant's own `load`ed graphs may keep cached, without a quota.
const DEFAULT_MODEL_MEMORY: u64 = 256 << 20;

impl Gateway {
    pub(super) async fn invoke(
        &self,
        request: Request,
        tenant: &str,
        name: &str,
        rest: String,
    ) -> Result<Response, ApiError> {
        check_name("tenant", tenant)?;
        check_name("function", name)?;
        let caller = self.require_tenant(request.headers()).await?;
        if caller != tenant {
            return Err(ApiError::forbidden(format!(
                "this key belongs to another tenant and cannot invoke /fn/{tenant}/{name}"
            )));
        }
        let record = self
            .store
            .function(tenant, name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no function {name:?}")))?;
        let version = record.active_version();
        let forwarded = self.peers.forwarded(&request)?;
        if !forwarded {
            super::access::bill(tenant);
        }
        if let Some(models) = &version.manifest.models
            && !forwarded
            && !models.iter().all(|m| self.holds(tenant, m))
        {
            let limit = version
                .manifest
                .max_request_bytes
                .unwrap_or(self.config.max_request_bytes);
            // Admitted here too: its body is held here, its answer relayed.
            let quota = self.tenant_record(tenant).await?.quota;
            let admitted = self.admission.admit(tenant, &quota)?;
            return self.forward(request, models, limit, admitted.permit).await;
        }
        // Counted when its response ends (a body cut off at the deadline
        // counts as that), or here when there is none.
        let mut counted = Some(Counted::new(self, tenant, name));
        let version = record.active_version();
        let outcome = self
            .run(request, tenant, name, version, &rest, &mut counted)
            .await;
        if let Some(counted) = counted {
            counted.finish(outcome.as_ref().map_or_else(ApiError::code, |_| "ok"));
        }
        outcome
    }

    /// Runs `version` for an admitted caller, under its limits and grants.
    async fn run(
        &self,
        mut request: Request,
        tenant: &str,
        name: &str,
        version: &Version,
        rest: &str,
        counted: &mut Option<Counted>,
    ) -> Result<Response, ApiError> {
        let quota = self
            .store
            .tenant(tenant)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no tenant {tenant:?}")))?
            .quota;
        let limits = self.limits_of(version, &quota);
        if declared_length(&request).is_some_and(|n| n > limits.request_bytes) {
            drain(request.body_mut()).await;
            return Err(request_too_large(limits.request_bytes));
        }
        let admitted = self.admission.admit(tenant, &quota)?;
        let permits: Vec<OwnedSemaphorePermit> = admitted
            .permit
            .into_iter()
            .chain(self.concurrency_permit(tenant, name, version)?)
            .collect();
        let function = self.runnable(version).await?;
        let log = self.logs.of(tenant, name);
        let mut capabilities = self.capabilities(tenant, version, &quota).await?;
        capabilities.compute = admitted.budget;
        let invocation = Invocation {
            log: log.clone(),
            log_limits: LogLimits::default(),
            timeout: limits.timeout,
            memory_bytes: limits.memory_bytes,
            capabilities,
            route: format!("/fn/{tenant}/{name}"),
        };
        let exceeded = Arc::new(AtomicBool::new(false));
        let (parts, body) = request.into_parts();
        let body = LimitedRequest::new(body, limits.request_bytes, exceeded.clone());
        let guest_request = guest_request(hyper::Request::from_parts(parts, body), rest)?;
        let outcome = function.handle(guest_request, invocation).await;
        if exceeded.load(Ordering::Relaxed) {
            return Err(request_too_large(limits.request_bytes));
        }
        match outcome {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                parts
                    .headers
                    .insert(VERSION_HEADER, HeaderValue::from(version.number));
                let ending = BodyEnding {
                    counted: counted.take().map(Counted::at_head),
                    log,
                    cut: parts.extensions.remove::<CutOff>(),
                    declared: parts
                        .headers
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                    span: tracing::Span::current(),
                };
                let body = LimitedResponse::new(body, limits.response_bytes, permits, ending);
                Ok(hyper::Response::from_parts(parts, super::Body::new(body)))
            }
            Err(error) => {
                let refusal = invoke_error(&error);
                match &error {
                    InvokeError::Trap(trap) | InvokeError::OutOfMemory(_, trap) => {
                        log.push("platform", &format!("{error}\n{}", trap.details));
                    }
                    InvokeError::Host(_) => log.push("platform", refusal.message()),
                    _ => log.push("platform", &error.to_string()),
                }
                Err(refusal)
            }
        }
    }

    /// The limits a version runs under: its manifest's, else the
    /// platform's, never more than its tenant's quota allows now (the quota
    /// may have shrunk since the deploy) nor the platform's.
    fn limits_of(&self, version: &Version, quota: &Quota) -> Limits {
        let manifest = &version.manifest;
        let platform = &self.config.limits;
        let mib_bytes =
            |mib: u64| usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let memory_cap = quota
            .max_memory_mib
            .map_or(platform.max_memory_bytes, mib_bytes)
            .min(platform.max_memory_bytes);
        Limits {
            timeout: manifest
                .timeout_ms
                .map_or(platform.timeout, Duration::from_millis)
                .min(platform.timeout),
            memory_bytes: manifest
                .memory_mib
                .map_or(memory_cap, mib_bytes)
                .min(memory_cap),
            request_bytes: manifest
                .max_request_bytes
                .unwrap_or(self.config.max_request_bytes),
            response_bytes: manifest
                .max_response_bytes
                .unwrap_or(self.config.max_response_bytes),
        }
    }

    /// What a version may use: its manifest's env, files, models and hosts,
    /// within the models its tenant may see.
    async fn capabilities(
        &self,
        tenant: &str,
        version: &Version,
        quota: &Quota,
    ) -> Result<Capabilities, ApiError> {
        let manifest = &version.manifest;
        let set = |models: &[String]| Arc::new(models.iter().cloned().collect::<BTreeSet<_>>());
        let visible = self.visible_models(quota);
        let mut outbound = OutboundAccess::hosts(&manifest.allowed_hosts);
        outbound.allow_local = self.config.allow_loopback_outbound;
        outbound.connections = Some(self.admission.outbound(tenant, quota));
        Ok(Capabilities {
            tenant: Arc::from(tenant),
            env: manifest
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            files: self.function_files(version).await?,
            model_aliases: Arc::new(manifest.model_aliases.clone()),
            models: ModelAccess {
                visible: Some(visible),
                allowed: manifest.models.as_deref().map(set),
            },
            outbound,
            compute: None,
            graph_memory: quota
                .max_model_memory_mib
                .map_or(DEFAULT_MODEL_MEMORY, |mib| mib << 20),
        })
    }

    /// The catalog key of the model `tenant` calls `name` (its private
    /// model of that name, else an operator's model it may see), if any.
    pub(super) fn model_key(&self, tenant: &str, quota: &Quota, name: &str) -> Option<String> {
        self.ai(tenant, quota, None).resolve(name).ok()
    }

    /// The models as `tenant` may use them from the gateway's own API (all
    /// it may see; no manifest), paid from `budget`.
    pub(super) fn ai(
        &self,
        tenant: &str,
        quota: &Quota,
        budget: Option<Arc<dyn ComputeBudget>>,
    ) -> AiService {
        self.runtime.ai(Capabilities {
            tenant: Arc::from(tenant),
            models: ModelAccess {
                visible: Some(self.visible_models(quota)),
                allowed: None,
            },
            compute: budget,
            ..Capabilities::default()
        })
    }

    /// The models a tenant may use: its quota's list, else the public ones.
    pub(super) fn visible_models(&self, quota: &Quota) -> Arc<BTreeSet<String>> {
        match &quota.models {
            Some(models) => Arc::new(models.iter().cloned().collect()),
            None => self.peers.public_models(),
        }
    }

    /// A slot under the version's `max_concurrency`, or 429.
    fn concurrency_permit(
        &self,
        tenant: &str,
        name: &str,
        version: &Version,
    ) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let Some(cap) = version.manifest.max_concurrency else {
            return Ok(None);
        };
        let semaphore = {
            let mut slots = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(format!("{tenant}/{name}@{}", version.number))
                .or_insert_with(|| Arc::new(Semaphore::new(cap as usize)))
                .clone()
        };
        semaphore.try_acquire_owned().map(Some).map_err(|_| {
            ApiError::too_many_requests(
                format!("{name} is already running {cap} requests (its max_concurrency)"),
                1,
            )
        })
    }
}

/// Counts an invocation when it ends: at its response's end, or without
/// one; also when the client hangs up first (hyper then drops the
/// request's future, or the body).
pub(super) struct Counted {
    metrics: Arc<super::metrics::Metrics>,
    usage: Arc<crate::usage::Meter>,
    tenant: String,
    name: String,
    started: std::time::Instant,
    /// Time to the response head, once it was ready.
    head: Option<Duration>,
    outcome: Option<&'static str>,
}

impl Counted {
    fn new(gateway: &Gateway, tenant: &str, name: &str) -> Self {
        Self {
            metrics: gateway.metrics.clone(),
            usage: gateway.usage.clone(),
            tenant: tenant.to_string(),
            name: name.to_string(),
            started: std::time::Instant::now(),
            head: None,
            outcome: None,
        }
    }

    /// Notes that the response head is ready (the latency counted).
    fn at_head(mut self) -> Self {
        self.head = Some(self.started.elapsed());
        self
    }

    /// Counts it with `outcome`: `ok` or an error code.
    pub(super) fn finish(mut self, outcome: &'static str) {
        self.outcome = Some(outcome);
    }

    /// The function's tenant and name.
    pub(super) fn function(&self) -> (&str, &str) {
        (&self.tenant, &self.name)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(CLIENT_CLOSED);
        let ran = self.started.elapsed();
        let took = self.head.unwrap_or(ran);
        self.metrics
            .invoked(&self.tenant, &self.name, outcome, took);
        let ran = u64::try_from(ran.as_micros()).unwrap_or(u64::MAX);
        self.usage
            .record(&self.tenant, |used| used.compute_us += ran);
    }
}

/// What a function's response body settles when it ends.
pub(super) struct BodyEnding {
    /// The invocation, counted then.
    pub counted: Option<Counted>,
    /// The function's log, told of a body cut off.
    pub log: Arc<crate::logs::FunctionLog>,
    /// Why the runtime cut the body off, once it has.
    pub cut: Option<CutOff>,
    /// The length the response declared (`Content-Length`), if any.
    pub declared: Option<u64>,
    /// The request's span, for what is logged when the body ends.
    pub span: tracing::Span,
}

impl BodyEnding {
    /// The body ended: cleanly (`None`), or cut off for `why` (the
    /// response limit, or the runtime's reason when it has one).
    pub(super) fn settle(&mut self, why: Option<String>) {
        let Some(counted) = self.counted.take() else {
            return;
        };
        let Some(why) = why else {
            return counted.finish("ok");
        };
        let (outcome, message) = match self.cut.as_ref().and_then(CutOff::why) {
            Some(failure) => (invoke_error(failure).code(), format!("{failure}")),
            None => ("response_cut_off", why),
        };
        let (tenant, function) = counted.function();
        let _span = self.span.enter();
        let message = format!("the response was cut off after it began: {message}");
        tracing::warn!(%tenant, %function, outcome, "{message}");
        self.log.push("platform", &message);
        counted.finish(outcome);
    }
}

/// The outcome of a request whose client left before its response head.
const CLIENT_CLOSED: &str = "client_closed";

/// One version's effective limits.
struct Limits {
    timeout: Duration,
    memory_bytes: usize,
    request_bytes: u64,
    response_bytes: u64,
}

fn declared_length(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn request_too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!(
        "the request body is over the function's {limit}-byte limit"
    ))
}

/// The request as the function sees it: the path below its mount point,
/// a Host header, and no platform credentials.
fn guest_request<B>(request: hyper::Request<B>, rest: &str) -> Result<hyper::Request<B>, ApiError> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_string(),
    };
    parts.uri = path_and_query
        .parse()
        .map_err(|e| ApiError::bad_request("bad_uri", format!("invalid request path: {e}")))?;
    parts.headers.remove(AUTHORIZATION);
    parts.headers.remove(super::cluster::CLUSTER_HEADER);
    if !parts.headers.contains_key(HOST) {
        parts
            .headers
            .insert(HOST, HeaderValue::from_static("localhost"));
    }
    Ok(hyper::Request::from_parts(parts, body))
}

fn invoke_error(error: &InvokeError) -> ApiError {
    let (status, code) = match error {
        InvokeError::Deadline(_) => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        InvokeError::Trap(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_trapped"),
        InvokeError::OutOfMemory(..) => (StatusCode::INTERNAL_SERVER_ERROR, "out_of_memory"),
        InvokeError::NoResponse => (StatusCode::INTERNAL_SERVER_ERROR, "no_response"),
        InvokeError::Guest(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_error"),
        InvokeError::Exited(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_exited"),
        InvokeError::Body(_) => (StatusCode::BAD_REQUEST, "bad_request_body"),
        InvokeError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        InvokeError::ModelBusy(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_busy"),
        InvokeError::Host(detail) => {
            // The host's own failure (descriptors, files …) is the operator's to read.
            let incident = incident_id();
            tracing::error!(%incident, "could not start a function: {detail}");
            let message = format!(
                "could not start the function (incident {incident}; the operator's log has the details)"
            );
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message);
        }
    };
    let retry = matches!(error, InvokeError::Overloaded | InvokeError::ModelBusy(_));
    let refusal = ApiError::new(status, code, error.to_string());
    if retry {
        refusal.retry_after(1)
    } else {
        refusal
    }
}
