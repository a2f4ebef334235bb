//! The control plane: tenants, keys, functions, models.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::routes::{Request, check_name, json};
use super::{ApiError, Gateway, Response};
use crate::auth::{self, Principal, TokenHash};
use crate::bundle::Bundle;
use crate::manifest::Caps;
use crate::quota::{PlatformLimits, Quota};
use crate::store::{FunctionRecord, NewVersion, Tenant, Version};

/// Largest JSON body of a control-plane call.
const MAX_JSON_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Activate {
    version: u32,
}

impl Gateway {
    pub(super) async fn whoami(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        let body = match self.authenticate(headers).await? {
            Principal::Admin => serde_json::json!({"role": "admin"}),
            Principal::Tenant(tenant) => {
                let record = self.tenant_record(&tenant).await?;
                serde_json::json!({
                    "role": "tenant", "tenant": tenant,
                    "quota": record.quota, "usage": record.usage,
                })
            }
        };
        Ok(json(StatusCode::OK, body))
    }

    pub(super) async fn tenant_record(&self, tenant: &str) -> Result<Tenant, ApiError> {
        check_name("tenant", tenant)?;
        self.store
            .tenant(tenant)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no tenant {tenant:?}")))
    }

    pub(super) async fn get_tenant(
        &self,
        headers: &HeaderMap,
        tenant: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin(headers).await?;
        let record = self.tenant_record(tenant).await?;
        Ok(json(StatusCode::OK, tenant_json(&record)))
    }

    pub(super) async fn set_quota(
        &self,
        request: Request,
        tenant: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin(request.headers()).await?;
        check_name("tenant", tenant)?;
        let quota: Quota = self.read_json(request).await?;
        quota
            .validate(&self.model_names(), &self.platform_limits())
            .map_err(|e| ApiError::bad_request("invalid_quota", e))?;
        let record = self.store.set_quota(tenant, &quota).await?;
        tracing::info!(%tenant, "quota set");
        Ok(json(StatusCode::OK, tenant_json(&record)))
    }

    pub(super) async fn list_keys(
        &self,
        headers: &HeaderMap,
        tenant: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin_or(headers, tenant).await?;
        self.tenant_record(tenant).await?;
        let keys: Vec<_> = self
            .store
            .keys_of(tenant)
            .await?
            .iter()
            .map(|key| serde_json::json!({"id": key.id, "tenant": key.tenant, "created_at": key.created_at}))
            .collect();
        Ok(json(StatusCode::OK, serde_json::json!({ "keys": keys })))
    }

    pub(super) async fn revoke_key(
        &self,
        headers: &HeaderMap,
        tenant: &str,
        id: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin_or(headers, tenant).await?;
        check_name("tenant", tenant)?;
        self.store.revoke_key(tenant, id).await?;
        tracing::info!(%tenant, %id, "API key revoked");
        Ok(no_content())
    }

    /// The models of this node and of the other live nodes.
    fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .runtime
            .models()
            .list()
            .into_iter()
            .filter(|m| m.owner.is_none())
            .map(|m| m.name)
            .collect();
        names.extend(self.peers.models().keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    pub(super) async fn list_tenants(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        self.require_admin(headers).await?;
        let tenants: Vec<_> = self
            .store
            .tenants()
            .await?
            .iter()
            .map(tenant_json)
            .collect();
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "tenants": tenants }),
        ))
    }

    pub(super) async fn create_tenant(&self, request: Request) -> Result<Response, ApiError> {
        self.require_admin(request.headers()).await?;
        let body: CreateTenant = self.read_json(request).await?;
        check_name("tenant", &body.name)?;
        let tenant = self.store.create_tenant(&body.name).await?;
        tracing::info!(tenant = %tenant.name, "tenant created");
        Ok(json(StatusCode::CREATED, tenant_json(&tenant)))
    }

    pub(super) async fn delete_tenant(
        &self,
        headers: &HeaderMap,
        tenant: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin(headers).await?;
        check_name("tenant", tenant)?;
        let functions = self.store.delete_tenant(tenant).await?;
        for function in &functions {
            self.forget_function(&function.tenant, &function.name, &function.versions);
        }
        self.admission.forget(tenant);
        self.metrics.forget(tenant, None);
        self.runtime.models().forget_tenant(tenant);
        // Its private models went with it.
        if let Err(error) = self.sync_models().await {
            tracing::warn!("{error:#}");
        }
        tracing::info!(%tenant, "tenant deleted");
        Ok(no_content())
    }

    pub(super) async fn create_key(
        &self,
        headers: &HeaderMap,
        tenant: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin_or(headers, tenant).await?;
        check_name("tenant", tenant)?;
        let key = auth::generate(auth::KEY_PREFIX)?;
        let record = self
            .store
            .add_key(tenant, &TokenHash::of(&key), &auth::key_id(&key))
            .await?;
        tracing::info!(%tenant, id = %record.id, "API key created");
        Ok(json(
            StatusCode::CREATED,
            serde_json::json!({
                "key": key,
                "id": record.id,
                "tenant": record.tenant,
                "created_at": record.created_at,
                "note": "the key is shown only this once",
            }),
        ))
    }

    pub(super) async fn list_functions(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(headers).await?;
        let functions: Vec<_> = self
            .store
            .functions(&tenant)
            .await?
            .iter()
            .map(|function| {
                let mut body = function_json(function);
                body["requests"] = self.metrics.function_requests(&tenant, &function.name);
                body
            })
            .collect();
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "functions": functions }),
        ))
    }

    pub(super) async fn get_function(
        &self,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(headers).await?;
        let function = self.find_function(&tenant, name).await?;
        let mut body = function_json(&function);
        body["requests"] = self.metrics.function_requests(&tenant, name);
        // Found in the binary: an HTTP handler, a command, a WAGI module.
        let kind = self.runnable(function.active_version()).await?.kind();
        body["kind"] = kind.as_str().into();
        Ok(json(StatusCode::OK, body))
    }

    /// `PUT /v1/functions/{name}/active` `{"version": N}`: requests go to
    /// version N from now on (a rollback, or forward again).
    pub(super) async fn activate_function(
        &self,
        request: Request,
        name: &str,
    ) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(request.headers()).await?;
        check_name("function", name)?;
        let Activate { version } = self.read_json(request).await?;
        let function = self.store.activate(&tenant, name, version).await?;
        tracing::info!(%tenant, function = %name, version, "version activated");
        Ok(json(StatusCode::OK, function_json(&function)))
    }

    pub(super) async fn delete_function(
        &self,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(headers).await?;
        let function = self.find_function(&tenant, name).await?;
        self.store.delete_function(&tenant, name).await?;
        self.forget_function(&tenant, name, &function.versions);
        tracing::info!(%tenant, function = %name, "function deleted");
        Ok(no_content())
    }

    pub(super) async fn function_logs(
        &self,
        headers: &HeaderMap,
        name: &str,
        follow: bool,
    ) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(headers).await?;
        self.find_function(&tenant, name).await?;
        let log = self.logs.of(&tenant, name);
        if follow {
            return Ok(super::follow::follow(&log, self.drain.begun()));
        }
        let lines = log.tail(usize::MAX);
        Ok(json(StatusCode::OK, serde_json::json!({ "lines": lines })))
    }

    /// Every model for the admin; a tenant sees only the models it may use.
    pub(super) async fn list_models(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        let mut models = self.runtime.models().list();
        let tenant = match self.authenticate(headers).await? {
            Principal::Tenant(tenant) => Some(tenant),
            Principal::Admin => None,
        };
        if let Some(tenant) = &tenant {
            let visible = self.visible_models(&self.tenant_record(tenant).await?.quota);
            models.retain(|m| match &m.owner {
                Some(owner) => owner == tenant,
                None => visible.contains(&m.name),
            });
        }
        let mut listed = serde_json::to_value(&models).map_err(anyhow::Error::from)?;
        if tenant.is_none() {
            // Who uses what: the operator's to see, not another tenant's.
            let mut used = self.runtime.models().tenant_use();
            for (model, entry) in models
                .iter()
                .zip(listed.as_array_mut().into_iter().flatten())
            {
                let tenants = used.remove(&model.key()).unwrap_or_default();
                entry["tenants"] = serde_json::to_value(tenants).map_err(anyhow::Error::from)?;
            }
        }
        // OpenAI's list shape too (`object`, `data`), for clients given
        // `http://host:port/v1` as their base URL.
        let data = self.openai_entries(tenant.as_deref()).await?;
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "models": listed, "object": "list", "data": data }),
        ))
    }

    /// The machine's devices, their memory and what models take of it.
    pub(super) async fn list_devices(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        self.authenticate(headers).await?;
        Ok(json(
            StatusCode::OK,
            serde_json::to_value(self.runtime.models().devices().list())
                .map_err(anyhow::Error::from)?,
        ))
    }

    /// `PUT /v1/functions/{name}`: the component itself (`application/wasm`)
    /// or a bundle (`application/x-tar`: `function.wasm`, `gigafactory.toml`, files).
    pub(super) async fn deploy(&self, request: Request, name: &str) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(request.headers()).await?;
        check_name("function", name)?;
        let is_bundle = request
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/x-tar"));
        let body = self
            .read_body(request, self.config.max_upload_bytes)
            .await?;
        let bundle = if is_bundle {
            Bundle::unpack(&body).map_err(|e| ApiError::bad_request("invalid_bundle", e))?
        } else {
            Bundle::wasm(body.to_vec())
        };
        let bundle_files: Vec<&str> = bundle.files.keys().map(String::as_str).collect();
        let private = self.runtime.models().private_names(&tenant);
        let mut known = self.model_names();
        known.extend(private.iter().cloned());
        bundle
            .manifest
            .validate(&self.manifest_caps(), &known, &bundle_files)
            .map_err(|e| ApiError::bad_request("invalid_manifest", e))?;
        let quota = self.tenant_record(&tenant).await?.quota;
        let mut usable = (*self.visible_models(&quota)).clone();
        usable.extend(private);
        quota
            .admits(&bundle.manifest, &usable)
            .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", e))?;
        let sha256 = hex::encode(Sha256::digest(&bundle.wasm));
        let artifact = match self.store.artifact(&sha256).await? {
            Some(artifact) => artifact,
            None => self.compile(&bundle.wasm).await?,
        };
        let files = bundle
            .manifest
            .files
            .iter()
            .map(|(guest, source)| {
                let content = bundle.files[source].as_slice();
                (
                    guest.clone(),
                    (hex::encode(Sha256::digest(content)), content),
                )
            })
            .collect();
        let new = NewVersion {
            wasm: &bundle.wasm,
            sha256: &sha256,
            artifact: &artifact,
            manifest: &bundle.manifest,
            files,
        };
        let deployed = self.store.deploy(&tenant, name, &new).await?;
        self.metrics.deployed();
        let function = &deployed.function;
        if deployed.created
            && let Some(replaced) = function.versions.iter().rev().nth(1)
        {
            self.retire_version(&tenant, name, replaced, function.active_version());
        }
        tracing::info!(%tenant, function = %name, version = function.active, created = deployed.created, "deployed");
        let status = if deployed.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(json(status, function_json(function)))
    }

    /// The most a manifest may ask of this platform.
    fn manifest_caps(&self) -> Caps {
        let limits = &self.config.limits;
        Caps {
            memory_mib: (limits.max_memory_bytes >> 20) as u64,
            timeout_ms: limits.timeout.as_millis() as u64,
            request_bytes: self.config.max_request_bytes,
            response_bytes: self.config.max_response_bytes,
            concurrency: limits.max_instances,
            local_hosts: self.config.allow_loopback_outbound,
        }
    }

    /// The platform limits a tenant's quota must stay within.
    fn platform_limits(&self) -> PlatformLimits {
        let limits = &self.config.limits;
        PlatformLimits {
            memory_mib: (limits.max_memory_bytes >> 20) as u64,
            concurrency: limits.max_instances,
        }
    }

    async fn find_function(&self, tenant: &str, name: &str) -> Result<FunctionRecord, ApiError> {
        check_name("function", name)?;
        self.store
            .function(tenant, name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no function {name:?}")))
    }
}

fn function_json(function: &FunctionRecord) -> serde_json::Value {
    let active = function.active_version();
    serde_json::json!({
        "name": function.name,
        "tenant": function.tenant,
        "url": format!("/fn/{}/{}", function.tenant, function.name),
        "active_version": function.active,
        "sha256": active.sha256,
        "size": active.size,
        "manifest": active.manifest,
        "created_at": function.created_at,
        "versions": function.versions.iter().map(version_json).collect::<Vec<_>>(),
    })
}

fn version_json(version: &Version) -> serde_json::Value {
    let files: serde_json::Map<String, serde_json::Value> = version
        .files
        .iter()
        .map(|(path, file)| {
            let file = serde_json::json!({"sha256": file.sha256, "size": file.size});
            (path.clone(), file)
        })
        .collect();
    let mut json = serde_json::json!({
        "number": version.number,
        "sha256": version.sha256,
        "size": version.size,
        "deployed_at": version.deployed_at,
        "manifest": version.manifest,
    });
    if !files.is_empty() {
        json["files"] = files.into();
    }
    json
}

/// A tenant as the API shows it.
fn tenant_json(tenant: &Tenant) -> serde_json::Value {
    serde_json::json!({
        "name": tenant.name,
        "created_at": tenant.created_at,
        "quota": tenant.quota,
        "usage": tenant.usage,
    })
}

pub(super) fn no_content() -> Response {
    hyper::Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(super::full(Bytes::new()))
        .expect("a valid response")
}

impl Gateway {
    /// Reads a whole body of at most `limit` bytes (413 past it); a body
    /// that stalls past the body idle timeout is refused with 408.
    pub(super) async fn read_body(
        &self,
        request: Request,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        let idle = self.config.body_idle_timeout;
        let too_large = || ApiError::too_large(format!("the body is over the {limit}-byte limit"));
        let declared = request
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body = request.into_body();
        if declared.is_some_and(|n| n > limit as u64) {
            drain(&mut body).await;
            return Err(too_large());
        }
        let mut collected = Vec::new();
        let whole = tokio::time::Instant::now() + self.config.control_timeout;
        loop {
            let wait = idle.min(whole.saturating_duration_since(tokio::time::Instant::now()));
            let frame = match tokio::time::timeout(wait, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return Err(body_stalled(idle, self.config.control_timeout)),
            };
            let frame = frame
                .map_err(|e| ApiError::bad_request("bad_body", format!("reading the body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if collected.len() + data.len() > limit {
                    drain(&mut body).await;
                    return Err(too_large());
                }
                collected.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(collected))
    }

    pub(super) async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        request: Request,
    ) -> Result<T, ApiError> {
        let body = self.read_body(request, MAX_JSON_BYTES).await?;
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("bad_json", format!("invalid JSON body: {e}")))
    }
}

/// 408 for a body that stopped arriving, or came too slowly.
fn body_stalled(idle: std::time::Duration, whole: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body came too slowly: it may pause at most {} ms and must be whole within {} s",
            idle.as_millis(),
            whole.as_secs()
        ),
    )
}

/// Reads and drops what a client is still sending of a refused body, up
/// to [`DRAIN_BYTES`] or for [`DRAIN_TIME`], so that it gets to read the
/// refusal rather than a connection reset while it writes.
pub(super) async fn drain(body: &mut super::Body) {
    let discard = async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let size = frame.data_ref().map_or(0, Bytes::len);
            if size >= left {
                break;
            }
            left -= size;
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

/// How much of a refused body is read before the connection is closed.
const DRAIN_BYTES: usize = 16 << 20;
/// How long a refused body is read before the connection is closed.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
