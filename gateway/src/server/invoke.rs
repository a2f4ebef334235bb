//! The data plane: `/fn/{tenant}/{function}/{*path}` runs the function's
//! active version with the request streamed through.

use gigafactory_runtime::logs::LogLimits;
use gigafactory_runtime::{Capabilities, Invocation, InvokeError};
use http_body_util::BodyExt;
use hyper::StatusCode;
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};

use super::routes::{Request, check_name};
use super::{ApiError, BoxError, Gateway, Metrics, Response};

/// Response header naming the version that answered.
pub const VERSION_HEADER: &str = "gigafactory-function-version";

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
        let caller = self.require_tenant(&request)?;
        if caller != tenant {
            return Err(ApiError::forbidden(format!(
                "this key belongs to another tenant and cannot invoke /fn/{tenant}/{name}"
            )));
        }
        let record = self
            .store
            .function(tenant, name)?
            .ok_or_else(|| ApiError::not_found(format!("no function {name:?}")))?;
        let version = record.active_version();
        let function = self.runnable(version).await?;
        let log = self.logs.of(tenant, name);
        let invocation = Invocation {
            log: log.clone(),
            log_limits: LogLimits::default(),
            timeout: self.config.limits.timeout,
            memory_bytes: self.config.limits.max_memory_bytes,
            capabilities: Capabilities::default(),
        };
        Metrics::count(&self.metrics.invocations);
        match function
            .handle(guest_request(request, &rest)?, invocation)
            .await
        {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                parts
                    .headers
                    .insert(VERSION_HEADER, HeaderValue::from(version.number));
                let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
                Ok(hyper::Response::from_parts(parts, body))
            }
            Err(error) => {
                Metrics::count(&self.metrics.invocation_errors);
                log.push("platform", &error.to_string());
                Err(invoke_error(error))
            }
        }
    }
}

/// The request as the function sees it: the path below its mount point,
/// a Host header, and no platform credentials.
fn guest_request(request: Request, rest: &str) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_string(),
    };
    parts.uri = path_and_query
        .parse()
        .map_err(|e| ApiError::bad_request("bad_uri", format!("invalid request path: {e}")))?;
    parts.headers.remove(AUTHORIZATION);
    if !parts.headers.contains_key(HOST) {
        parts
            .headers
            .insert(HOST, HeaderValue::from_static("localhost"));
    }
    Ok(hyper::Request::from_parts(parts, body))
}

fn invoke_error(error: InvokeError) -> ApiError {
    let (status, code) = match &error {
        InvokeError::Deadline(_) => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        InvokeError::Trap(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_trapped"),
        InvokeError::OutOfMemory(..) => (StatusCode::INTERNAL_SERVER_ERROR, "out_of_memory"),
        InvokeError::NoResponse => (StatusCode::INTERNAL_SERVER_ERROR, "no_response"),
        InvokeError::Guest(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_error"),
        InvokeError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        InvokeError::Host(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    ApiError::new(status, code, error.to_string())
}
