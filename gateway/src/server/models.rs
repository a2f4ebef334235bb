//! `/v1/models/…` and `/v1/model-files/…`: models added, updated and
//! removed at run time. The operator (admin token) manages the models
//! every tenant may be granted; a tenant (its key) manages private models
//! only it sees, within its quota's `max_model_bytes`.
//!
//! A file is uploaded in parts, each stored as it arrives, so an upload
//! of many gigabytes that stops resumes where it stopped:
//! `PUT /v1/model-files/{sha256}` `{"size": N}` says which parts the
//! store has, `PUT /v1/model-files/{sha256}/parts/{i}` sends one (with
//! its own sha256 in `x-part-sha256`). `POST /v1/models` then adds the
//! model from its files — reading each back whole against its sha256 —
//! with the `model.toml` given, or one generated from what the file
//! declares; `PUT /v1/models/{name}` stores a new version.

use std::collections::BTreeMap;

use hyper::HeaderMap;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::fleet::{Mismatch, safe_path};
use super::routes::{Request, check_model_name, json};
use super::{ApiError, Gateway, Response};
use crate::auth::Principal;
use crate::store::{FileRef, MAX_MODEL_FILE_BYTES, ModelBlob, ModelRecord, NewModel};
use gigafactory_runtime::models::{Hints, ModelFormat, Origin};

/// Files one model may have.
const MAX_FILES: usize = 16;

/// What `POST /v1/models` and `PUT /v1/models/{name}` take.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRequest {
    /// The model's name (`POST` only; `PUT` takes it from the path).
    #[serde(default)]
    name: Option<String>,
    /// Its files: path in its directory → uploaded file. `PUT` without
    /// them keeps the current files.
    #[serde(default)]
    files: Option<BTreeMap<String, FileSpec>>,
    /// Its `model.toml`; without it, `PUT` keeps the current one when it
    /// still names one of the files, and otherwise one is generated.
    #[serde(default)]
    config: Option<String>,
    /// For a generated `model.toml`: which file is the model (default: the
    /// only `.onnx` or `.gguf` file), its format, task, and whether every
    /// tenant may use it.
    #[serde(default)]
    model_file: Option<String>,
    #[serde(default)]
    format: Option<ModelFormat>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    public: bool,
    /// For a LoRA adapter with a generated model.toml: its base text
    /// model, and how much of it applies (default 1).
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    scale: Option<f32>,
    /// Instead of `files` (operator only): a file or directory on the node
    /// that answers, which it stores itself (a directory's `model.toml` is
    /// the config unless one is given).
    #[serde(default)]
    path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    sha256: String,
    size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginUpload {
    size: u64,
}

impl Gateway {
    /// Whose models the request manages: the operator's (`None`) or its tenant's.
    async fn model_owner(&self, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
        Ok(match self.authenticate(headers).await? {
            Principal::Admin => None,
            Principal::Tenant(tenant) => Some(tenant),
        })
    }

    pub(super) async fn begin_upload(
        &self,
        request: Request,
        sha256: &str,
    ) -> Result<Response, ApiError> {
        let owner = self.model_owner(request.headers()).await?;
        check_sha256(sha256)?;
        let body: BeginUpload = self.read_json(request).await?;
        if body.size > MAX_MODEL_FILE_BYTES {
            return Err(ApiError::too_large(format!(
                "a model file may have at most {MAX_MODEL_FILE_BYTES} bytes, not {}",
                body.size
            )));
        }
        // Refused early when it could never fit (the sum is checked when
        // the model is added); a file it has already is not counted again.
        if let Some(tenant) = &owner
            && self.store.model_blob(Some(tenant), sha256).await?.is_none()
        {
            let record = self.tenant_record(tenant).await?;
            let pending = self.store.pending_model_bytes(tenant).await?;
            record
                .quota
                .admits_model_bytes(record.usage.model_bytes + pending + body.size)
                .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", e))?;
        }
        let blob = self
            .store
            .begin_model_blob(owner.as_deref(), sha256, body.size)
            .await?;
        Ok(json(StatusCode::OK, blob_json(&blob)))
    }

    pub(super) async fn upload_state(
        &self,
        headers: &HeaderMap,
        sha256: &str,
    ) -> Result<Response, ApiError> {
        let owner = self.model_owner(headers).await?;
        check_sha256(sha256)?;
        let blob = self
            .store
            .model_blob(owner.as_deref(), sha256)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no upload of {sha256} was begun")))?;
        Ok(json(StatusCode::OK, blob_json(&blob)))
    }

    pub(super) async fn upload_part(
        &self,
        request: Request,
        sha256: &str,
        index: &str,
    ) -> Result<Response, ApiError> {
        let owner = self.model_owner(request.headers()).await?;
        check_sha256(sha256)?;
        let index: u32 = index.parse().map_err(|_| {
            ApiError::bad_request("invalid_part", format!("part {index:?} is not a number"))
        })?;
        let expected = request
            .headers()
            .get("x-part-sha256")
            .map(|v| v.to_str().unwrap_or_default().to_ascii_lowercase());
        let limit = crate::store::MODEL_PART_BYTES as usize;
        let body = self.read_body(request, limit).await?;
        if let Some(expected) = expected {
            let digest = {
                let body = body.clone();
                tokio::task::spawn_blocking(move || hex::encode(Sha256::digest(&body)))
                    .await
                    .map_err(|e| ApiError::internal(e.into()))?
            };
            if digest != expected {
                return Err(ApiError::bad_request(
                    "part_mismatch",
                    format!(
                        "part {index} arrived with sha256 {digest}, not {expected}: send it again"
                    ),
                ));
            }
        }
        let blob = self
            .store
            .put_model_part(owner.as_deref(), sha256, index, &body)
            .await?;
        Ok(json(StatusCode::OK, blob_json(&blob)))
    }

    /// `POST /v1/models` (`name` in the body) adds a model; `PUT
    /// /v1/models/{name}` stores a new version of one.
    pub(super) async fn put_model(
        &self,
        request: Request,
        name: Option<&str>,
    ) -> Result<Response, ApiError> {
        let owner = self.model_owner(request.headers()).await?;
        let replace = name.is_some();
        let mut body: ModelRequest = self.read_json(request).await?;
        if let Some(path) = body.path.take() {
            if owner.is_some() {
                return Err(ApiError::forbidden(
                    "only the operator adds models from files on the node",
                ));
            }
            if body.files.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "give files or path, not both",
                ));
            }
            let (files, config) = self.import(&path).await?;
            body.files = Some(files);
            if body.config.is_none() {
                body.config = config;
            }
        }
        let name = match (name, &body.name) {
            (Some(path), Some(named)) if path != named => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("the body names {named:?}, the path {path:?}"),
                ));
            }
            (Some(name), _) => name.to_string(),
            (None, Some(name)) => name.clone(),
            (None, None) => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "name: the model's name is missing",
                ));
            }
        };
        check_model_name(&name)?;
        if owner.is_some() && body.public {
            return Err(private_is_never_public());
        }
        if owner.is_none() && self.runtime.models().origin(&name) == Some(Origin::Directory) {
            return Err(ApiError::conflict(format!(
                "{name:?} is a model of the repository directory: edit it there (and send SIGHUP)"
            )));
        }
        let current = self.store.model(owner.as_deref(), &name).await?;
        let files: BTreeMap<String, FileRef> = match (&body.files, &current) {
            (Some(files), _) => files
                .iter()
                .map(|(path, f)| {
                    let file = FileRef {
                        sha256: f.sha256.clone(),
                        size: f.size,
                    };
                    (path.clone(), file)
                })
                .collect(),
            (None, Some(current)) if replace => current.files.clone(),
            (None, _) => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "files: the model's files are missing",
                ));
            }
        };
        if files.is_empty() || files.len() > MAX_FILES {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "files: a model has 1 to {MAX_FILES} files, not {}",
                    files.len()
                ),
            ));
        }
        if let Some(tenant) = &owner {
            // Refused before any file is copied to this node.
            let record = self.tenant_record(tenant).await?;
            let before = current.as_ref().map_or(0, ModelRecord::stored_bytes);
            let after: u64 = files.values().map(|f| f.size).sum();
            record
                .quota
                .admits_model_bytes(record.usage.model_bytes.saturating_sub(before) + after)
                .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", e))?;
        }
        let mut local = BTreeMap::new();
        for (path, file) in &files {
            safe_path(path).map_err(|e| ApiError::bad_request("invalid_path", format!("{e:#}")))?;
            check_sha256(&file.sha256)?;
            local.insert(
                path.clone(),
                self.uploaded(owner.as_deref(), path, file).await?,
            );
        }
        let keep = current
            .as_ref()
            .filter(|_| body.files.is_some() || body.config.is_none());
        let config = match (&body.config, keep) {
            (Some(config), _) => config.clone(),
            (None, Some(current))
                if self
                    .runtime
                    .models()
                    .check_config(&current.config, owner.is_some())
                    .is_ok_and(|c| files.contains_key(&c.file)) =>
            {
                current.config.clone()
            }
            (None, _) => self.generate_config(&body, &local).await?,
        };
        let checked = self
            .runtime
            .models()
            .check_config(&config, owner.is_some())
            .map_err(|e| ApiError::bad_request("invalid_config", e))?;
        if !files.contains_key(&checked.file) {
            return Err(ApiError::bad_request(
                "invalid_config",
                format!(
                    "model.toml names file {:?}, which is not one of the model's files ({:?})",
                    checked.file,
                    files.keys().collect::<Vec<_>>()
                ),
            ));
        }
        if owner.is_some() && checked.public {
            return Err(private_is_never_public());
        }
        if let Some(embedding) = &checked.embedding
            && !files.contains_key(&embedding.vocabulary)
        {
            return Err(ApiError::bad_request(
                "invalid_config",
                format!(
                    "[embedding] vocabulary {:?} is not one of the model's files",
                    embedding.vocabulary
                ),
            ));
        }
        if checked.lora.as_ref().is_some_and(|lora| lora.base == name) {
            return Err(ApiError::bad_request(
                "invalid_config",
                "[lora] base: an adapter cannot be its own base",
            ));
        }
        gigafactory_runtime::models::format_of(
            &local[&checked.file],
            &checked.file,
            Some(checked.format),
        )
        .map_err(|e| ApiError::bad_request("invalid_model", e))?;
        if let Some(lora) = &checked.lora {
            self.check_base(owner.as_deref(), &lora.base).await?;
        }
        let new = NewModel {
            owner: owner.clone(),
            name: name.clone(),
            config,
            files,
        };
        let record = self.store.put_model(&new, replace).await?;
        tracing::info!(model = %record.key(), version = record.version, "model stored");
        self.sync_models().await.map_err(ApiError::internal)?;
        let status = if replace {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(json(status, self.model_json(&record)))
    }

    /// Stores the file or the directory's files at `path` on this node as
    /// model files, as an upload would (read in parts, off the async
    /// workers): their references, and the directory's `model.toml`.
    async fn import(
        &self,
        path: &str,
    ) -> Result<(BTreeMap<String, FileSpec>, Option<String>), ApiError> {
        let root = std::path::PathBuf::from(path);
        let bad = |why: String| ApiError::bad_request("invalid_path", why);
        if !root.is_absolute() {
            return Err(bad(format!("{path:?} is not an absolute path")));
        }
        let local = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || local_files(&root))
                .await
                .map_err(|e| ApiError::internal(e.into()))?
                .map_err(|e| bad(format!("{e:#}")))?
        };
        let (mut files, mut config) = (BTreeMap::new(), None);
        for (relative, file) in local {
            if relative == "model.toml" {
                config = Some(std::fs::read_to_string(&file).map_err(|e| bad(e.to_string()))?);
                continue;
            }
            let (sha256, size) = {
                let reading = file.clone();
                tokio::task::spawn_blocking(move || hash_file(&reading))
                    .await
                    .map_err(|e| ApiError::internal(e.into()))?
                    .map_err(|e| bad(format!("reading {}: {e}", file.display())))?
            };
            let blob = self.store.begin_model_blob(None, &sha256, size).await?;
            for index in (0..blob.parts()).filter(|i| blob.received.binary_search(i).is_err()) {
                let (file, offset, len) = (
                    file.clone(),
                    u64::from(index) * blob.part_size,
                    blob.part_len(index),
                );
                let part = tokio::task::spawn_blocking(move || read_part(&file, offset, len))
                    .await
                    .map_err(|e| ApiError::internal(e.into()))?
                    .map_err(|e| ApiError::internal(e.into()))?;
                self.store
                    .put_model_part(None, &sha256, index, &part)
                    .await?;
            }
            tracing::info!(file = %file.display(), size, "stored a model file from this node");
            files.insert(relative, FileSpec { sha256, size });
        }
        Ok((files, config))
    }

    /// This node's copy of an uploaded file, read back whole from the store
    /// against its sha256 the first time (a file that does not match is
    /// dropped, to be sent again).
    async fn uploaded(
        &self,
        owner: Option<&str>,
        path: &str,
        file: &FileRef,
    ) -> Result<std::path::PathBuf, ApiError> {
        let blob = self
            .store
            .model_blob(owner, &file.sha256)
            .await?
            .filter(|b| b.size == file.size)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "not_uploaded",
                    format!(
                        "{path}: no file of sha256 {} and {} bytes was uploaded",
                        file.sha256, file.size
                    ),
                )
            })?;
        if !blob.complete() {
            let missing: Vec<u32> = (0..blob.parts())
                .filter(|i| blob.received.binary_search(i).is_err())
                .take(10)
                .collect();
            return Err(ApiError::conflict(format!(
                "{path}: the upload is not finished ({} of {} parts; missing {missing:?}…)",
                blob.received.len(),
                blob.parts()
            )));
        }
        // The store's parts are read back whole before they count as the
        // file: while fetching this node's copy, or on their own when the
        // node has a copy already (from an earlier upload of that content).
        let has_copy = std::fs::metadata(self.fleet.blob_path(owner, &file.sha256))
            .is_ok_and(|m| m.len() == file.size);
        let checked = if blob.verified || !has_copy {
            self.fetch_blob(owner, file).await
        } else {
            match self.read_blob(owner, &blob, None).await {
                Ok(digest) if digest == file.sha256 => self.fetch_blob(owner, file).await,
                Ok(digest) => Err(Mismatch::new(&file.sha256, &digest).into()),
                Err(error) => Err(error),
            }
        };
        match checked {
            Ok(local) => {
                if !blob.verified {
                    self.store
                        .verify_model_blob(owner, &file.sha256, true)
                        .await?;
                }
                Ok(local)
            }
            Err(error) if error.downcast_ref::<Mismatch>().is_some() => {
                self.store
                    .verify_model_blob(owner, &file.sha256, false)
                    .await?;
                Err(ApiError::bad_request(
                    "file_mismatch",
                    format!("{path}: {error:#}; its parts were dropped: upload it again"),
                ))
            }
            Err(error) => Err(ApiError::internal(error)),
        }
    }

    /// Refuses a LoRA adapter whose base is not a text model its owner may use.
    async fn check_base(&self, owner: Option<&str>, base: &str) -> Result<(), ApiError> {
        let pool = self.runtime.models();
        let key = match owner {
            None => pool.has(base).then(|| base.to_string()),
            Some(tenant) => {
                let quota = self.tenant_record(tenant).await?.quota;
                self.model_key(tenant, &quota, base)
            }
        };
        let info = key.and_then(|key| pool.info(&key)).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_config",
                format!("[lora] base: no model {base:?} you may use"),
            )
        })?;
        if info.format != ModelFormat::Gguf || info.lora.is_some() {
            return Err(ApiError::bad_request(
                "invalid_config",
                format!("[lora] base: {base:?} is not a GGUF text model"),
            ));
        }
        Ok(())
    }

    /// A `model.toml` from what the model file declares.
    async fn generate_config(
        &self,
        body: &ModelRequest,
        local: &BTreeMap<String, std::path::PathBuf>,
    ) -> Result<String, ApiError> {
        let model_file = match &body.model_file {
            Some(file) if local.contains_key(file) => file.clone(),
            Some(file) => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("model_file {file:?} is not one of the files"),
                ));
            }
            None => {
                let candidates: Vec<&String> = local
                    .keys()
                    .filter(|p| p.ends_with(".onnx") || p.ends_with(".gguf"))
                    .collect();
                match candidates.as_slice() {
                    [only] => (*only).clone(),
                    _ if local.len() == 1 => local.keys().next().expect("one").clone(),
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_request",
                            format!(
                                "model_file: say which of {:?} is the model",
                                local.keys().collect::<Vec<_>>()
                            ),
                        ));
                    }
                }
            }
        };
        let hints = Hints {
            file: model_file.clone(),
            format: body.format,
            task: body.task.clone(),
            public: body.public,
            siblings: local
                .keys()
                .filter(|p| **p != model_file)
                .cloned()
                .collect(),
        };
        let path = local[&model_file].clone();
        let lora = body
            .base
            .clone()
            .map(|base| (base, body.scale.unwrap_or(1.0)));
        tokio::task::spawn_blocking(move || match lora {
            Some((base, scale)) => {
                gigafactory_runtime::models::adapter_config(&path, &hints, &base, scale)
            }
            None => gigafactory_runtime::models::generate_config(&path, &hints),
        })
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .map_err(|e| ApiError::bad_request("invalid_model", e))
    }

    pub(super) async fn show_model(
        &self,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<Response, ApiError> {
        let owner = self.model_owner(headers).await?;
        check_model_name(name)?;
        // Also in OpenAI's shape (`id`, `object`, `created`, `owned_by`),
        // for `models.retrieve` of clients given `http://host:port/v1`.
        let openai = |created: u64| {
            json!({
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": if owner.is_some() { "you" } else { "gigafactory" },
            })
        };
        let merged = |mut shown: Value, created: u64| {
            if let (Some(shown), Value::Object(extra)) = (shown.as_object_mut(), openai(created)) {
                shown.extend(extra);
            }
            shown
        };
        if let Some(record) = self.store.model(owner.as_deref(), name).await? {
            let shown = merged(self.model_json(&record), record.created_at);
            return Ok(json(StatusCode::OK, shown));
        }
        // A model of the repository directory, or another node's view.
        let pool = self.runtime.models();
        let visible = match &owner {
            None => true,
            Some(tenant) => {
                let quota = self.tenant_record(tenant).await?.quota;
                self.visible_models(&quota).contains(name)
            }
        };
        match pool.info(name).filter(|_| visible) {
            Some(info) => Ok(json(StatusCode::OK, merged(json!({ "model": info }), 0))),
            None => Err(ApiError::not_found(format!("no model {name:?}"))),
        }
    }

    /// What the API shows of a stored model: its record and its state here.
    fn model_json(&self, record: &ModelRecord) -> Value {
        json!({
            "name": record.name,
            "owner": record.owner,
            "version": record.version,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "files": record.files.iter().map(|(path, f)| {
                (path.clone(), json!({"sha256": f.sha256, "size": f.size}))
            }).collect::<serde_json::Map<String, Value>>(),
            "config": record.config,
            "model": self.runtime.models().info(&record.key()),
        })
    }

    /// `DELETE /v1/models/{name}`: refused while a function's manifest
    /// names the model, unless `?force=true`.
    pub(super) async fn remove_model(
        &self,
        headers: &HeaderMap,
        name: &str,
        force: bool,
    ) -> Result<Response, ApiError> {
        let owner = self.model_owner(headers).await?;
        check_model_name(name)?;
        if !force {
            let users = self.functions_naming(owner.as_deref(), name).await?;
            if !users.is_empty() {
                return Err(ApiError::conflict(format!(
                    "functions name {name:?} in their manifest: {}{}; remove them first or pass force",
                    users.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if users.len() > 5 { ", …" } else { "" }
                )));
            }
        }
        let record = self.store.delete_model(owner.as_deref(), name).await?;
        tracing::info!(model = %record.key(), "model removed");
        self.sync_models().await.map_err(ApiError::internal)?;
        Ok(super::control::no_content())
    }

    /// The functions (`tenant/function`) whose active version's manifest
    /// names the model: any tenant's for an operator's model, its owner's
    /// for a private one.
    async fn functions_naming(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Vec<String>, ApiError> {
        let tenants = match owner {
            Some(owner) => vec![owner.to_string()],
            None => self
                .store
                .tenants()
                .await?
                .into_iter()
                .map(|t| t.name)
                .collect(),
        };
        let mut users = Vec::new();
        for tenant in tenants {
            for function in self.store.functions(&tenant).await? {
                let manifest = &function.active_version().manifest;
                if manifest.models.iter().flatten().any(|m| m == name) {
                    users.push(format!("{tenant}/{}", function.name));
                }
            }
        }
        Ok(users)
    }

    /// `POST /v1/repository/rescan` (admin): rereads the repository directory.
    pub(super) async fn rescan(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        self.require_admin(headers).await?;
        let rescan = self.rescan_repository().await.ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("rereading the repository failed"))
        })?;
        Ok(json(
            StatusCode::OK,
            serde_json::to_value(rescan).map_err(|e| ApiError::internal(e.into()))?,
        ))
    }
}

/// The regular file at `root`, or those below the directory `root`, by
/// their path in the model's directory.
fn local_files(root: &std::path::Path) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    let meta = std::fs::metadata(root)?;
    if meta.is_file() {
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("{} has no UTF-8 file name", root.display()))?;
        return Ok(vec![(name.to_string(), root.to_path_buf())]);
    }
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file() {
                let relative = path
                    .strip_prefix(root)?
                    .to_str()
                    .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", path.display()))?
                    .to_string();
                found.push((relative, path));
            }
        }
        if found.len() > MAX_FILES + 1 {
            anyhow::bail!("{} has more than {MAX_FILES} files", root.display());
        }
    }
    found.sort();
    Ok(found)
}

fn hash_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), size))
}

fn read_part(path: &std::path::Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut part = vec![0; len as usize];
    file.read_exact(&mut part)?;
    Ok(part)
}

fn blob_json(blob: &ModelBlob) -> Value {
    json!({
        "sha256": blob.sha256,
        "size": blob.size,
        "part_size": blob.part_size,
        "parts": blob.parts(),
        "received": blob.received,
        "complete": blob.complete(),
        "verified": blob.verified,
    })
}

fn private_is_never_public() -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        "a tenant's model is private: it cannot be public",
    )
}

/// A sha256 in hex: 64 of `0-9a-f`.
fn check_sha256(sha256: &str) -> Result<(), ApiError> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_sha256",
            format!("{sha256:?} is not a sha256: 64 lowercase hex digits"),
        ))
    }
}
