//! The embedded store: sled in the data directory, opened by one process.
//! Records are [`records`](super::records) in trees; every multi-key
//! update is one sled transaction. Changes are announced in-process.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};
use sled::{Db, Tree};
use tokio::sync::broadcast;

use super::records::{StoredModelBlob, decode as from_json, encode as to_json};
use super::{
    ApiKey, Change, Deployed, FunctionRecord, MODEL_PART_BYTES, ModelBlob, ModelRecord, NewModel,
    NewVersion, Node, NodeStatus, Planned, Store, StoreError, Tenant, Version, now, owned_key,
    unusable_blob,
};
use crate::auth::TokenHash;
use crate::quota::{Quota, Usage};
use crate::usage::{Consumed, UsageRow};

/// The sled database and its trees.
#[derive(Clone)]
pub struct SledStore {
    db: Db,
    meta: Tree,
    tenants: Tree,
    keys: Tree,
    functions: Tree,
    blobs: Tree,
    blob_refs: Tree,
    artifacts: Tree,
    models: Tree,
    model_blobs: Tree,
    model_parts: Tree,
    usage: Tree,
    fingerprint: String,
    changes: broadcast::Sender<Change>,
    /// Held shared by every change and exclusively by a backup, which so
    /// sees one moment of the store.
    writes: Arc<tokio::sync::RwLock<()>>,
    /// This process's node, as its last heartbeat reported it.
    node: Arc<Mutex<Option<(NodeStatus, Instant)>>>,
}

const ADMIN_TOKEN: &str = "admin_token_sha256";

impl SledStore {
    /// Opens (or creates) the store in `dir`; artifacts are read and
    /// written for the engine `fingerprint`.
    pub fn open(dir: &Path, fingerprint: &str) -> Result<Self> {
        let db =
            sled::open(dir).with_context(|| format!("opening the store in {}", dir.display()))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .with_context(|| format!("opening tree {name}"))
        };
        Ok(Self {
            meta: tree("meta")?,
            tenants: tree("tenants")?,
            keys: tree("keys")?,
            functions: tree("functions")?,
            blobs: tree("blobs")?,
            blob_refs: tree("blob_refs")?,
            artifacts: tree("artifacts")?,
            models: tree("models")?,
            model_blobs: tree("model_blobs")?,
            model_parts: tree("model_parts")?,
            usage: tree("usage")?,
            fingerprint: fingerprint.to_string(),
            changes: broadcast::channel(super::CHANGES_BUFFERED).0,
            writes: Arc::default(),
            node: Arc::default(),
            db,
        })
    }

    /// Flushes to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().context("flushing the store")?;
        Ok(())
    }

    /// The admin token's hash, if one was set.
    pub fn admin_token(&self) -> Result<Option<TokenHash>> {
        let value = self.meta.get(ADMIN_TOKEN)?;
        Ok(value.and_then(|v| TokenHash::from_slice(&v)))
    }

    /// Sets the admin token's hash.
    pub fn set_admin_token(&self, hash: &TokenHash) -> Result<()> {
        self.meta.insert(ADMIN_TOKEN, hash.as_bytes())?;
        self.flush()
    }

    /// Creates a tenant; a conflict when the name is taken.
    pub fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let tenant = Tenant {
            name: name.to_string(),
            created_at: now(),
            quota: Quota::default(),
            usage: Usage::default(),
            revision: 0,
            incarnation: self.db.generate_id().map_err(anyhow::Error::from)?,
            deleting: false,
        };
        let swapped = self
            .tenants
            .compare_and_swap(name, None as Option<&[u8]>, Some(to_json(&tenant)?))
            .map_err(anyhow::Error::from)?;
        if swapped.is_err() {
            return Err(StoreError::Conflict(format!(
                "tenant {name:?} already exists"
            )));
        }
        self.flush()?;
        Ok(tenant)
    }

    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> Result<Option<Tenant>> {
        self.tenants.get(name)?.map(|v| from_json(&v)).transpose()
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Result<Vec<Tenant>> {
        self.tenants
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// Replaces a tenant's quota.
    pub fn set_quota(&self, name: &str, quota: &Quota) -> Result<Tenant, StoreError> {
        let result = self.tenants.transaction(|tenants| {
            let mut tenant = live_tenant(tenants, name)?;
            tenant.quota = quota.clone();
            tenants.insert(name, to_json(&tenant).map_err(storage)?)?;
            Ok(tenant)
        });
        let tenant = finish(result)?;
        self.flush()?;
        Ok(tenant)
    }

    /// Deletes a tenant with its keys and functions, in one transaction.
    /// sled cannot scan inside a transaction, so the keys and functions are
    /// listed first and the transaction checks that the tenant's revision
    /// (bumped by every key or function change) did not move meanwhile;
    /// if it did, it lists again.
    /// Returns the functions it deleted.
    pub fn delete_tenant(&self, name: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        self.mark_deleting(name)?;
        for _ in 0..DELETE_ATTEMPTS {
            let Some(seen) = self.tenant(name)? else {
                return Err(StoreError::NotFound(format!("no tenant {name:?}")));
            };
            let functions = self.functions(name)?;
            let keys = self.key_hashes_of(name)?;
            let models = self.models_of(Some(name))?;
            let uploads = self.unused_blobs_of(name)?;
            match self.delete_tenant_at(&seen, &keys, &functions, &models, &uploads) {
                Err(StoreError::Moved) => continue,
                outcome => {
                    outcome?;
                    self.flush()?;
                    return Ok(functions);
                }
            }
        }
        Err(StoreError::Conflict(format!(
            "tenant {name:?} kept changing while being deleted; try again"
        )))
    }

    /// Marks a tenant as being deleted, so that no key, function or quota
    /// is stored for it any more (a deletion cut short by a crash is
    /// finished by deleting again).
    fn mark_deleting(&self, name: &str) -> Result<(), StoreError> {
        let result = self.tenants.transaction(|tenants| {
            let Some(value) = tenants.get(name)? else {
                return abort(StoreError::NotFound(format!("no tenant {name:?}")));
            };
            let mut tenant: Tenant = from_json(&value).map_err(storage)?;
            tenant.deleting = true;
            tenant.revision += 1;
            tenants.insert(name, to_json(&tenant).map_err(storage)?)?;
            Ok(())
        });
        finish(result)
    }

    fn delete_tenant_at(
        &self,
        seen: &Tenant,
        keys: &[sled::IVec],
        functions: &[FunctionRecord],
        models: &[ModelRecord],
        uploads: &[(sled::IVec, StoredModelBlob)],
    ) -> Result<(), StoreError> {
        let name = seen.name.as_str();
        let trees = (
            &self.tenants,
            &self.keys,
            &self.functions,
            &self.blob_refs,
            &self.blobs,
            &self.artifacts,
            &self.models,
            &self.model_blobs,
            &self.model_parts,
        );
        let result = trees.transaction(
            |(
                tenants,
                keys_tx,
                functions_tx,
                refs,
                blobs,
                artifacts,
                models_tx,
                model_blobs,
                model_parts,
            )| {
                let Some(value) = tenants.remove(name)? else {
                    return abort(StoreError::NotFound(format!("no tenant {name:?}")));
                };
                let tenant: Tenant = from_json(&value).map_err(storage)?;
                if (tenant.incarnation, tenant.revision) != (seen.incarnation, seen.revision) {
                    return abort(StoreError::Moved);
                }
                for key in keys {
                    keys_tx.remove(key)?;
                }
                for function in functions {
                    functions_tx.remove(function_key(name, &function.name).as_bytes())?;
                    for blob in function.versions.iter().flat_map(Version::blobs) {
                        self.release_blob(refs, blobs, artifacts, blob)?;
                    }
                }
                for model in models {
                    models_tx.remove(model.key().as_bytes())?;
                    for file in model.files.values() {
                        let id = owned_key(Some(name), &file.sha256);
                        release_model_blob(model_blobs, model_parts, &id)?;
                    }
                }
                // Its uploads too, finished or not (one begun meanwhile is
                // pruned later): a later tenant of the name starts with none.
                for (id, stored) in uploads {
                    model_blobs.remove(id)?;
                    let id = String::from_utf8_lossy(id);
                    for &index in &stored.blob.received {
                        model_parts.remove(part_key(&id, index).as_bytes())?;
                    }
                }
                Ok(())
            },
        );
        finish(result)
    }

    /// The hashes of a tenant's keys (read outside any transaction; a
    /// record that does not parse is nobody's and skipped).
    fn key_hashes_of(&self, tenant: &str) -> Result<Vec<sled::IVec>> {
        let mut hashes = Vec::new();
        for entry in self.keys.iter() {
            let (hash, value) = entry?;
            if from_json::<ApiKey>(&value).is_ok_and(|key| key.tenant == tenant) {
                hashes.push(hash);
            }
        }
        Ok(hashes)
    }

    /// Stores a new API key (by hash) for `tenant`.
    pub fn add_key(&self, tenant: &str, hash: &TokenHash, id: &str) -> Result<ApiKey, StoreError> {
        let key = ApiKey {
            id: id.to_string(),
            tenant: tenant.to_string(),
            created_at: now(),
        };
        let value = to_json(&key)?;
        let result = (&self.tenants, &self.keys).transaction(|(tenants, keys)| {
            bump_revision(tenants, tenant)?;
            keys.insert(hash.as_bytes(), value.as_slice())?;
            Ok(())
        });
        finish(result)?;
        self.flush()?;
        Ok(key)
    }

    /// A tenant's keys (ids only).
    pub fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>> {
        let mut keys = Vec::new();
        for value in self.keys.iter().values() {
            let key: ApiKey = from_json(&value?)?;
            if key.tenant == tenant {
                keys.push(key);
            }
        }
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    /// Revokes the key of `tenant` with public id `id`.
    pub fn revoke_key(&self, tenant: &str, id: &str) -> Result<TokenHash, StoreError> {
        let not_found = || StoreError::NotFound(format!("tenant {tenant:?} has no key {id:?}"));
        let mut found = None;
        for entry in self.keys.iter() {
            let (hash, value) = entry.map_err(anyhow::Error::from)?;
            let key: ApiKey = from_json(&value)?;
            if key.tenant == tenant && key.id == id {
                found = Some(hash);
                break;
            }
        }
        let hash = found.ok_or_else(not_found)?;
        let result = (&self.tenants, &self.keys).transaction(|(tenants, keys)| {
            if keys.remove(&hash)?.is_none() {
                return abort(not_found());
            }
            bump_revision(tenants, tenant)
        });
        finish(result)?;
        self.flush()?;
        let hash = TokenHash::from_slice(&hash)
            .ok_or_else(|| anyhow::anyhow!("a stored key hash is not 32 bytes"))?;
        Ok(hash)
    }

    /// The key record for a key hash.
    pub fn key(&self, hash: &TokenHash) -> Result<Option<ApiKey>> {
        self.keys
            .get(hash.as_bytes())?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Records a deploy: the blob, its artifact, and a new active version
    /// (unless the wasm is the active version's already).
    pub fn deploy(
        &self,
        tenant: &str,
        name: &str,
        new: &NewVersion<'_>,
    ) -> Result<Deployed, StoreError> {
        let key = function_key(tenant, name);
        let artifact_key = artifact_key(new.sha256, &self.fingerprint);
        let trees = (
            &self.tenants,
            &self.functions,
            &self.blob_refs,
            &self.blobs,
            &self.artifacts,
        );
        let result = trees.transaction(|(tenants, functions, refs, blobs, artifacts)| {
            let mut owner = live_tenant(tenants, tenant)?;
            let existing: Option<FunctionRecord> = match functions.get(key.as_bytes())? {
                Some(v) => Some(from_json(&v).map_err(storage)?),
                None => None,
            };
            let (function, usage) = match new.plan(&owner, name, existing) {
                Ok(Planned::New { function, usage }) => (function, usage),
                Ok(Planned::Unchanged(function)) => {
                    let created = false;
                    return Ok(Deployed { function, created });
                }
                Err(refused) => return abort(refused),
            };
            owner.usage = usage;
            owner.revision += 1;
            tenants.insert(tenant, to_json(&owner).map_err(storage)?)?;
            for (sha256, content) in new.blobs() {
                retain_blob(refs, blobs, sha256, content)?;
            }
            artifacts.insert(artifact_key.as_bytes(), new.artifact)?;
            let value = to_json(&function).map_err(storage)?;
            functions.insert(key.as_bytes(), value)?;
            Ok(Deployed {
                function,
                created: true,
            })
        });
        let deployed = finish(result)?;
        self.flush()?;
        Ok(deployed)
    }

    /// Makes version `number` of a function the active one.
    pub fn activate(
        &self,
        tenant: &str,
        name: &str,
        number: u32,
    ) -> Result<FunctionRecord, StoreError> {
        let key = function_key(tenant, name);
        let result = self.functions.transaction(|functions| {
            let Some(value) = functions.get(key.as_bytes())? else {
                return abort(StoreError::NotFound(format!("no function {name:?}")));
            };
            let mut function: FunctionRecord = from_json(&value).map_err(storage)?;
            if let Err(missing) = function.activate(number) {
                return abort(missing);
            }
            functions.insert(key.as_bytes(), to_json(&function).map_err(storage)?)?;
            Ok(function)
        });
        let function = finish(result)?;
        self.flush()?;
        Ok(function)
    }

    /// A function of `tenant`.
    pub fn function(&self, tenant: &str, name: &str) -> Result<Option<FunctionRecord>> {
        self.functions
            .get(function_key(tenant, name))?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// Every function of `tenant`, by name.
    pub fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>> {
        self.functions
            .scan_prefix(format!("{tenant}/"))
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    /// Deletes a function and every version; blobs no other function uses go too.
    pub fn delete_function(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        let key = function_key(tenant, name);
        let trees = (
            &self.tenants,
            &self.functions,
            &self.blob_refs,
            &self.blobs,
            &self.artifacts,
        );
        let result = trees.transaction(|(tenants, functions, refs, blobs, artifacts)| {
            let Some(value) = functions.remove(key.as_bytes())? else {
                return abort(StoreError::NotFound(format!("no function {name:?}")));
            };
            let function: FunctionRecord = from_json(&value).map_err(storage)?;
            for blob in function.versions.iter().flat_map(Version::blobs) {
                self.release_blob(refs, blobs, artifacts, blob)?;
            }
            if let Some(owner) = tenants.get(tenant)? {
                let mut owner: Tenant = from_json(&owner).map_err(storage)?;
                owner.usage.functions = owner.usage.functions.saturating_sub(1);
                let freed: u64 = function.versions.iter().map(Version::stored_bytes).sum();
                owner.usage.stored_bytes = owner.usage.stored_bytes.saturating_sub(freed);
                owner.revision += 1;
                tenants.insert(tenant, to_json(&owner).map_err(storage)?)?;
            }
            Ok(())
        });
        finish(result)?;
        self.flush()?;
        Ok(())
    }

    /// The wasm with this sha256.
    pub fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.blobs.get(sha256)?.map(|v| v.to_vec()))
    }

    /// The precompiled artifact of a blob for this engine.
    pub fn artifact(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .artifacts
            .get(artifact_key(sha256, &self.fingerprint))?
            .map(|v| v.to_vec()))
    }

    /// Stores a recompiled artifact (after an engine upgrade), if the blob is still live.
    pub fn put_artifact(&self, sha256: &str, artifact: &[u8]) -> Result<()> {
        let key = artifact_key(sha256, &self.fingerprint);
        let result = (&self.blob_refs, &self.artifacts).transaction(|(refs, artifacts)| {
            if refs.get(sha256)?.is_some() {
                artifacts.insert(key.as_bytes(), artifact)?;
            }
            Ok(())
        });
        finish::<()>(result).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// Drops artifacts compiled by other engines; returns how many.
    pub fn prune_artifacts(&self) -> Result<usize> {
        let suffix = format!("/{}", self.fingerprint);
        let mut pruned = 0;
        for key in self.artifacts.iter().keys() {
            let key = key?;
            if !key.ends_with(suffix.as_bytes()) {
                self.artifacts.remove(&key)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

/// Models and their files.
impl SledStore {
    fn stored_blob(&self, owner: Option<&str>, sha256: &str) -> Result<Option<StoredModelBlob>> {
        self.model_blobs
            .get(owned_key(owner, sha256))?
            .map(|v| from_json(&v))
            .transpose()
    }

    fn begin_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> Result<ModelBlob, StoreError> {
        let id = owned_key(owner, sha256);
        let result = self.model_blobs.transaction(|blobs| {
            let stored = match blobs.get(id.as_str())? {
                Some(value) => {
                    let mut stored: StoredModelBlob = from_json(&value).map_err(storage)?;
                    if let Err(refused) = stored.blob.resumes(size) {
                        return abort(refused);
                    }
                    stored.updated_at = now();
                    stored
                }
                None => StoredModelBlob {
                    blob: ModelBlob {
                        sha256: sha256.to_string(),
                        size,
                        part_size: MODEL_PART_BYTES,
                        received: Vec::new(),
                        verified: false,
                    },
                    refs: 0,
                    updated_at: now(),
                },
            };
            blobs.insert(id.as_str(), to_json(&stored).map_err(storage)?)?;
            Ok(stored.blob)
        });
        finish(result)
    }

    fn put_model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
        content: &[u8],
    ) -> Result<ModelBlob, StoreError> {
        let id = owned_key(owner, sha256);
        let key = part_key(&id, index);
        let trees = (&self.model_blobs, &self.model_parts);
        let result = trees.transaction(|(blobs, parts)| {
            let Some(value) = blobs.get(id.as_str())? else {
                return abort(StoreError::NotFound(format!(
                    "no upload of the model file {sha256} was begun"
                )));
            };
            let mut stored: StoredModelBlob = from_json(&value).map_err(storage)?;
            if let Err(refused) = stored.blob.check_part(index, content.len()) {
                return abort(refused);
            }
            if let Err(at) = stored.blob.received.binary_search(&index) {
                stored.blob.received.insert(at, index);
                parts.insert(key.as_bytes(), content)?;
            }
            stored.updated_at = now();
            blobs.insert(id.as_str(), to_json(&stored).map_err(storage)?)?;
            Ok(stored.blob)
        });
        finish(result)
    }

    fn verify_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        matched: bool,
    ) -> Result<(), StoreError> {
        let id = owned_key(owner, sha256);
        let trees = (&self.model_blobs, &self.model_parts);
        let result = trees.transaction(|(blobs, parts)| {
            let Some(value) = blobs.get(id.as_str())? else {
                return abort(StoreError::NotFound(format!("no model file {sha256}")));
            };
            let mut stored: StoredModelBlob = from_json(&value).map_err(storage)?;
            if matched {
                stored.blob.verified = true;
            } else if !stored.blob.verified {
                for index in std::mem::take(&mut stored.blob.received) {
                    parts.remove(part_key(&id, index).as_bytes())?;
                }
            }
            stored.updated_at = now();
            blobs.insert(id.as_str(), to_json(&stored).map_err(storage)?)?;
            Ok(())
        });
        finish(result)
    }

    fn put_model(&self, new: &NewModel, replace: bool) -> Result<ModelRecord, StoreError> {
        let key = owned_key(new.owner.as_deref(), &new.name);
        let trees = (
            &self.tenants,
            &self.models,
            &self.model_blobs,
            &self.model_parts,
        );
        let result = trees.transaction(|(tenants, models, blobs, parts)| {
            let existing: Option<ModelRecord> = match models.get(key.as_bytes())? {
                Some(value) => Some(from_json(&value).map_err(storage)?),
                None => None,
            };
            let record = match new.plan(existing.as_ref(), replace) {
                Ok(record) => record,
                Err(refused) => return abort(refused),
            };
            let owner = new.owner.as_deref();
            for (path, file) in &new.files {
                let id = owned_key(owner, &file.sha256);
                let stored: Option<StoredModelBlob> = match blobs.get(id.as_str())? {
                    Some(value) => Some(from_json(&value).map_err(storage)?),
                    None => None,
                };
                if let Some(refused) = unusable_blob(path, stored.as_ref().map(|s| &s.blob)) {
                    return abort(refused);
                }
                let mut stored = stored.expect("checked");
                stored.refs += 1;
                blobs.insert(id.as_str(), to_json(&stored).map_err(storage)?)?;
            }
            for file in existing.iter().flat_map(|old| old.files.values()) {
                release_model_blob(blobs, parts, &owned_key(owner, &file.sha256))?;
            }
            if let Some(owner) = &new.owner {
                let mut tenant = live_tenant(tenants, owner)?;
                tenant.usage = match new.usage_of(&tenant, existing.as_ref()) {
                    Ok(usage) => usage,
                    Err(refused) => return abort(refused),
                };
                tenant.revision += 1;
                tenants.insert(owner.as_str(), to_json(&tenant).map_err(storage)?)?;
            }
            models.insert(key.as_bytes(), to_json(&record).map_err(storage)?)?;
            Ok(record)
        });
        let record = finish(result)?;
        self.flush()?;
        Ok(record)
    }

    fn model(&self, owner: Option<&str>, name: &str) -> Result<Option<ModelRecord>> {
        self.models
            .get(owned_key(owner, name))?
            .map(|v| from_json(&v))
            .transpose()
    }

    /// The operator's models (`None`) or a tenant's private ones.
    fn models_of(&self, owner: Option<&str>) -> Result<Vec<ModelRecord>> {
        let mut models = Vec::new();
        for value in self.models.iter().values() {
            let model: ModelRecord = from_json(&value?)?;
            if model.owner.as_deref() == owner {
                models.push(model);
            }
        }
        Ok(models)
    }

    fn all_models(&self) -> Result<Vec<ModelRecord>> {
        self.models
            .iter()
            .values()
            .map(|v| from_json(&v?))
            .collect()
    }

    fn delete_model(&self, owner: Option<&str>, name: &str) -> Result<ModelRecord, StoreError> {
        let key = owned_key(owner, name);
        let trees = (
            &self.tenants,
            &self.models,
            &self.model_blobs,
            &self.model_parts,
        );
        let result = trees.transaction(|(tenants, models, blobs, parts)| {
            let Some(value) = models.remove(key.as_bytes())? else {
                return abort(StoreError::NotFound(format!("no model {name:?}")));
            };
            let model: ModelRecord = from_json(&value).map_err(storage)?;
            for file in model.files.values() {
                release_model_blob(blobs, parts, &owned_key(owner, &file.sha256))?;
            }
            if let Some(owner) = owner
                && let Some(value) = tenants.get(owner)?
            {
                let mut tenant: Tenant = from_json(&value).map_err(storage)?;
                tenant.usage.model_bytes = tenant
                    .usage
                    .model_bytes
                    .saturating_sub(model.stored_bytes());
                tenant.revision += 1;
                tenants.insert(owner, to_json(&tenant).map_err(storage)?)?;
            }
            Ok(model)
        });
        let model = finish(result)?;
        self.flush()?;
        Ok(model)
    }

    /// The tenant `owner`'s model files no model uses, by id.
    fn unused_blobs_of(&self, owner: &str) -> Result<Vec<(sled::IVec, StoredModelBlob)>> {
        let mut unused = Vec::new();
        for entry in self.model_blobs.scan_prefix(format!("{owner}/")) {
            let (id, value) = entry?;
            let stored: StoredModelBlob = from_json(&value)?;
            if stored.refs == 0 {
                unused.push((id, stored));
            }
        }
        Ok(unused)
    }

    fn prune_model_blobs(&self, before: u64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        for entry in self.model_blobs.iter() {
            let (id, value) = entry.map_err(anyhow::Error::from)?;
            let stored: StoredModelBlob = from_json(&value)?;
            if stored.refs > 0 || stored.updated_at >= before {
                continue;
            }
            let trees = (&self.model_blobs, &self.model_parts);
            let result = trees.transaction(|(blobs, parts)| {
                // Looked at again inside: an upload may have touched it since.
                let Some(value) = blobs.get(&id)? else {
                    return Ok(false);
                };
                let stored: StoredModelBlob = from_json(&value).map_err(storage)?;
                if stored.refs > 0 || stored.updated_at >= before {
                    return Ok(false);
                }
                blobs.remove(&id)?;
                let id = String::from_utf8_lossy(&id);
                for index in stored.blob.received {
                    parts.remove(part_key(&id, index).as_bytes())?;
                }
                Ok(true)
            });
            pruned += usize::from(finish(result)?);
        }
        self.flush()?;
        Ok(pruned)
    }
}

/// Drops one model's use of the model file `id` (its owner's key of its
/// sha256); the last one deletes it.
fn release_model_blob(
    blobs: &TransactionalTree,
    parts: &TransactionalTree,
    id: &str,
) -> Result<(), TxError> {
    let Some(value) = blobs.get(id)? else {
        return Ok(());
    };
    let mut stored: StoredModelBlob = from_json(&value).map_err(storage)?;
    stored.refs = stored.refs.saturating_sub(1);
    if stored.refs == 0 {
        blobs.remove(id)?;
        for index in stored.blob.received {
            parts.remove(part_key(id, index).as_bytes())?;
        }
    } else {
        blobs.insert(id, to_json(&stored).map_err(storage)?)?;
    }
    Ok(())
}

/// A part of the model file `id` (its owner's key of its sha256).
fn part_key(id: &str, index: u32) -> String {
    format!("{id}#{index:08x}")
}

impl SledStore {
    /// Tells the receivers of [`Store::changes`] (none is fine).
    fn announce(&self, change: Change) {
        let _ = self.changes.send(change);
    }
}

#[async_trait]
impl Store for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn admin_token(&self) -> Result<Option<TokenHash>, StoreError> {
        Ok(SledStore::admin_token(self)?)
    }

    async fn set_admin_token(&self, hash: &TokenHash) -> Result<(), StoreError> {
        let _writing = self.writes.read().await;
        Ok(SledStore::set_admin_token(self, hash)?)
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let _writing = self.writes.read().await;
        let tenant = SledStore::create_tenant(self, name)?;
        self.announce(Change::Tenant(name.to_string()));
        Ok(tenant)
    }

    async fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        Ok(SledStore::tenant(self, name)?)
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        Ok(SledStore::tenants(self)?)
    }

    async fn set_quota(&self, name: &str, quota: &Quota) -> Result<Tenant, StoreError> {
        let _writing = self.writes.read().await;
        let tenant = SledStore::set_quota(self, name, quota)?;
        self.announce(Change::Tenant(name.to_string()));
        Ok(tenant)
    }

    async fn delete_tenant(&self, name: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        let _writing = self.writes.read().await;
        let outcome = SledStore::delete_tenant(self, name);
        // Marked for deletion even when the deletion itself failed.
        self.announce(Change::Tenant(name.to_string()));
        outcome
    }

    async fn add_key(
        &self,
        tenant: &str,
        hash: &TokenHash,
        id: &str,
    ) -> Result<ApiKey, StoreError> {
        let _writing = self.writes.read().await;
        let key = SledStore::add_key(self, tenant, hash, id)?;
        self.announce(Change::Key(hash.clone()));
        Ok(key)
    }

    async fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>, StoreError> {
        Ok(SledStore::keys_of(self, tenant)?)
    }

    async fn revoke_key(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        let _writing = self.writes.read().await;
        let hash = SledStore::revoke_key(self, tenant, id)?;
        self.announce(Change::Key(hash));
        Ok(())
    }

    async fn key(&self, hash: &TokenHash) -> Result<Option<ApiKey>, StoreError> {
        Ok(SledStore::key(self, hash)?)
    }

    async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        new: &NewVersion<'_>,
    ) -> Result<Deployed, StoreError> {
        let _writing = self.writes.read().await;
        let deployed = SledStore::deploy(self, tenant, name, new)?;
        if deployed.created {
            self.announce(Change::Tenant(tenant.to_string()));
            self.announce(Change::Function {
                tenant: tenant.to_string(),
                name: name.to_string(),
            });
        }
        Ok(deployed)
    }

    async fn function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError> {
        Ok(SledStore::function(self, tenant, name)?)
    }

    async fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        Ok(SledStore::functions(self, tenant)?)
    }

    async fn delete_function(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        let _writing = self.writes.read().await;
        SledStore::delete_function(self, tenant, name)?;
        self.announce(Change::Tenant(tenant.to_string()));
        self.announce(Change::Function {
            tenant: tenant.to_string(),
            name: name.to_string(),
        });
        Ok(())
    }

    async fn activate(
        &self,
        tenant: &str,
        name: &str,
        number: u32,
    ) -> Result<FunctionRecord, StoreError> {
        let _writing = self.writes.read().await;
        let function = SledStore::activate(self, tenant, name, number)?;
        self.announce(Change::Tenant(tenant.to_string()));
        self.announce(Change::Function {
            tenant: tenant.to_string(),
            name: name.to_string(),
        });
        Ok(function)
    }

    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(SledStore::blob(self, sha256)?)
    }

    async fn artifact(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(SledStore::artifact(self, sha256)?)
    }

    async fn put_artifact(&self, sha256: &str, artifact: &[u8]) -> Result<(), StoreError> {
        Ok(SledStore::put_artifact(self, sha256, artifact)?)
    }

    async fn prune_artifacts(&self) -> Result<usize, StoreError> {
        Ok(SledStore::prune_artifacts(self)?)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(SledStore::flush(self)?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // In this process: it answers while the process does.
        Ok(())
    }

    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        let _writing = self.writes.read().await;
        let result = self.usage.transaction(|usage| {
            for row in rows {
                let key = usage_key(&row.tenant, row.hour);
                let mut consumed: Consumed = match usage.get(&key)? {
                    Some(value) => from_json(&value).map_err(storage)?,
                    None => Consumed::default(),
                };
                consumed.add(&row.consumed);
                usage.insert(key, to_json(&consumed).map_err(storage)?)?;
            }
            Ok(())
        });
        finish(result)?;
        Ok(SledStore::flush(self)?)
    }

    async fn usage(
        &self,
        tenant: Option<&str>,
        since: u64,
        until: u64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let records = match tenant {
            Some(tenant) => self.usage.scan_prefix([tenant.as_bytes(), b"\0"].concat()),
            None => self.usage.iter(),
        };
        let mut rows = Vec::new();
        for record in records {
            let (key, value) = record.map_err(anyhow::Error::from)?;
            let (tenant, hour) = split_usage_key(&key)?;
            if (since..until).contains(&hour) {
                rows.push(UsageRow {
                    tenant,
                    hour,
                    consumed: from_json(&value)?,
                });
            }
        }
        Ok(rows)
    }

    async fn backup(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<super::backup::Summary, StoreError> {
        let quiet = self.writes.clone().write_owned().await;
        let db = self.db.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _quiet = quiet;
            super::backup::write(&db, out)
        })
        .await
        .map_err(anyhow::Error::from)??;
        Ok(written)
    }

    async fn begin_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> Result<ModelBlob, StoreError> {
        let _writing = self.writes.read().await;
        SledStore::begin_model_blob(self, owner, sha256, size)
    }

    async fn model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
    ) -> Result<Option<ModelBlob>, StoreError> {
        Ok(self.stored_blob(owner, sha256)?.map(|stored| stored.blob))
    }

    async fn put_model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
        content: &[u8],
    ) -> Result<ModelBlob, StoreError> {
        let _writing = self.writes.read().await;
        SledStore::put_model_part(self, owner, sha256, index, content)
    }

    async fn model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .model_parts
            .get(part_key(&owned_key(owner, sha256), index))
            .map_err(anyhow::Error::from)?
            .map(|v| v.to_vec()))
    }

    async fn verify_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        matched: bool,
    ) -> Result<(), StoreError> {
        let _writing = self.writes.read().await;
        SledStore::verify_model_blob(self, owner, sha256, matched)?;
        Ok(SledStore::flush(self)?)
    }

    async fn put_model(&self, model: &NewModel, replace: bool) -> Result<ModelRecord, StoreError> {
        let _writing = self.writes.read().await;
        let record = SledStore::put_model(self, model, replace)?;
        if let Some(owner) = &record.owner {
            self.announce(Change::Tenant(owner.clone()));
        }
        self.announce(Change::Model(record.key()));
        Ok(record)
    }

    async fn model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Option<ModelRecord>, StoreError> {
        Ok(SledStore::model(self, owner, name)?)
    }

    async fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        Ok(self.all_models()?)
    }

    async fn delete_model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<ModelRecord, StoreError> {
        let _writing = self.writes.read().await;
        let record = SledStore::delete_model(self, owner, name)?;
        if let Some(owner) = owner {
            self.announce(Change::Tenant(owner.to_string()));
        }
        self.announce(Change::Model(record.key()));
        Ok(record)
    }

    async fn pending_model_bytes(&self, owner: &str) -> Result<u64, StoreError> {
        Ok(self
            .unused_blobs_of(owner)?
            .iter()
            .map(|(_, stored)| stored.blob.size)
            .sum())
    }

    async fn prune_model_blobs(&self, before: u64) -> Result<usize, StoreError> {
        let _writing = self.writes.read().await;
        SledStore::prune_model_blobs(self, before)
    }

    // One process opens the embedded store: its only node is itself.
    async fn heartbeat(&self, node: &NodeStatus, _: Duration) -> Result<(), StoreError> {
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = Some((node.clone(), Instant::now()));
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let node = self.node.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(node
            .map(|(status, at)| Node {
                status,
                silent_for: at.elapsed(),
            })
            .into_iter()
            .collect())
    }

    async fn leave(&self, _: &NodeStatus) -> Result<(), StoreError> {
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }
}

impl SledStore {
    /// Drops one reference to a blob; the last one removes the blob and its artifact.
    fn release_blob(
        &self,
        refs: &TransactionalTree,
        blobs: &TransactionalTree,
        artifacts: &TransactionalTree,
        sha256: &str,
    ) -> Result<(), TxError> {
        let count = refs.get(sha256)?.map_or(0, |v| decode_u64(&v));
        if count <= 1 {
            refs.remove(sha256)?;
            blobs.remove(sha256)?;
            artifacts.remove(artifact_key(sha256, &self.fingerprint).as_bytes())?;
        } else {
            refs.insert(sha256, &(count - 1).to_be_bytes())?;
        }
        Ok(())
    }
}

/// Adds one reference to a blob, storing it on the first.
fn retain_blob(
    refs: &TransactionalTree,
    blobs: &TransactionalTree,
    sha256: &str,
    content: &[u8],
) -> Result<(), TxError> {
    let count = refs.get(sha256)?.map_or(0, |v| decode_u64(&v)) + 1;
    refs.insert(sha256, &count.to_be_bytes())?;
    if count == 1 {
        blobs.insert(sha256, content)?;
    }
    Ok(())
}

/// How often a tenant deletion lists its keys and functions again when
/// they keep changing underneath it.
const DELETE_ATTEMPTS: usize = 16;

/// A tenant inside a transaction: `NotFound` when there is none, or when
/// it is being deleted.
fn live_tenant(tenants: &TransactionalTree, name: &str) -> Result<Tenant, TxError> {
    let Some(value) = tenants.get(name)? else {
        return abort(StoreError::NotFound(format!("no tenant {name:?}")));
    };
    let tenant: Tenant = from_json(&value).map_err(storage)?;
    if tenant.deleting {
        return abort(StoreError::NotFound(format!(
            "tenant {name:?} is being deleted"
        )));
    }
    Ok(tenant)
}

/// Bumps a tenant's revision inside a transaction; `NotFound` without it
/// (or while it is being deleted).
fn bump_revision(tenants: &TransactionalTree, name: &str) -> Result<(), TxError> {
    let mut tenant = live_tenant(tenants, name)?;
    tenant.revision += 1;
    tenants.insert(name, to_json(&tenant).map_err(storage)?)?;
    Ok(())
}

type TxError = ConflictableTransactionError<StoreError>;

fn abort<T>(error: StoreError) -> Result<T, TxError> {
    Err(ConflictableTransactionError::Abort(error))
}

fn storage(error: impl Into<anyhow::Error>) -> TxError {
    ConflictableTransactionError::Abort(StoreError::Storage(error.into()))
}

fn finish<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Storage(e.into()),
    })
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// A usage record's key: the tenant, a NUL, the hour big-endian (so a
/// tenant's hours list in order).
fn usage_key(tenant: &str, hour: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 9);
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(&hour.to_be_bytes());
    key
}

fn split_usage_key(key: &[u8]) -> Result<(String, u64)> {
    let (tenant, hour) = key
        .len()
        .checked_sub(9)
        .map(|at| key.split_at(at))
        .context("a usage key is too short")?;
    let hour: [u8; 8] = hour[1..].try_into()?;
    Ok((
        String::from_utf8(tenant.to_vec()).context("a usage key's tenant")?,
        u64::from_be_bytes(hour),
    ))
}

fn function_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

fn artifact_key(sha256: &str, fingerprint: &str) -> String {
    format!("{sha256}/{fingerprint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backup;

    #[test]
    fn every_tree_is_backed_up_or_derived() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), "test").unwrap();
        let listed: Vec<&str> = [
            backup::RECORD_TREES,
            backup::BLOB_TREES,
            backup::DERIVED_TREES,
        ]
        .concat();
        for name in store.db.tree_names() {
            let name = String::from_utf8(name.to_vec()).unwrap();
            assert!(
                name == "__sled__default" || listed.contains(&name.as_str()),
                "tree {name} is in no backup list"
            );
        }
    }

    fn usage_of(tenant: &str, requests: u64) -> UsageRow {
        UsageRow {
            tenant: tenant.to_string(),
            hour: 7 * crate::usage::HOUR,
            consumed: Consumed {
                requests,
                ..Consumed::default()
            },
        }
    }

    #[tokio::test]
    async fn a_backup_restores_every_record_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("a"), "test").unwrap();
        Store::create_tenant(&store, "acme").await.unwrap();
        let hash = TokenHash::of("gf_secret");
        Store::add_key(&store, "acme", &hash, "gf_secr")
            .await
            .unwrap();
        Store::add_usage(&store, &[usage_of("acme", 2)])
            .await
            .unwrap();
        Store::add_usage(&store, &[usage_of("acme", 3)])
            .await
            .unwrap();
        let file = dir.path().join("backup.tar");
        let written = Store::backup(&store, Box::new(std::fs::File::create(&file).unwrap()))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let archive = std::fs::read(&file).unwrap();
        assert_eq!((written.tenants, written.keys), (1, 1));

        let restored_dir = dir.path().join("b");
        let restored = backup::restore(&restored_dir, archive.as_slice()).unwrap();
        assert_eq!(restored, written);
        let again = SledStore::open(&restored_dir, "test").unwrap();
        assert_eq!(again.key(&hash).unwrap().unwrap().tenant, "acme");
        let usage = Store::usage(&again, Some("acme"), 0, u64::MAX)
            .await
            .unwrap();
        assert_eq!(usage, vec![usage_of("acme", 5)]);
        // A tenant made after the restore is a new incarnation.
        let old = again.tenant("acme").unwrap().unwrap().incarnation;
        assert!(again.create_tenant("later").unwrap().incarnation > old);

        let refused = backup::restore(&restored_dir, archive.as_slice()).unwrap_err();
        assert!(
            refused.to_string().contains("already holds a store"),
            "{refused:#}"
        );
        let cut = &archive[..archive.len() / 2];
        assert!(backup::check(cut).is_err());
        assert!(!dir.path().join("c").exists());
        assert!(backup::restore(&dir.path().join("c"), cut).is_err());
        assert!(
            !dir.path().join("c").exists(),
            "a failed restore leaves no store"
        );
    }

    #[test]
    fn nothing_is_stored_for_a_tenant_being_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), "test").unwrap();
        store.create_tenant("t").unwrap();
        store.mark_deleting("t").unwrap();
        let refused = store.add_key("t", &TokenHash::of("k"), "k").unwrap_err();
        assert!(refused.to_string().contains("being deleted"), "{refused}");
        assert!(store.set_quota("t", &Quota::default()).is_err());
        // A deletion cut short finishes when asked again.
        store.delete_tenant("t").unwrap();
        assert!(store.tenant("t").unwrap().is_none());
    }

    #[test]
    fn a_deletion_never_matches_a_later_tenant_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), "test").unwrap();
        store.create_tenant("t").unwrap();
        store.add_key("t", &TokenHash::of("old"), "old").unwrap();
        let stale = store.tenant("t").unwrap().unwrap();
        store.delete_tenant("t").unwrap();
        store.create_tenant("t").unwrap();
        let new = TokenHash::of("new");
        store.add_key("t", &new, "new").unwrap();
        assert_eq!(store.tenant("t").unwrap().unwrap().revision, stale.revision);
        let outcome = store.delete_tenant_at(&stale, &[], &[], &[], &[]);
        assert!(matches!(outcome, Err(StoreError::Moved)), "{outcome:?}");
        assert!(store.key(&new).unwrap().is_some());
    }

    #[test]
    fn a_key_added_during_a_tenant_deletion_goes_with_the_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), "test").unwrap();
        for round in 0..300u32 {
            store.create_tenant("race").unwrap();
            let adders: Vec<_> = (0..4)
                .map(|i| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        let hash = TokenHash::of(&format!("key-{round}-{i}"));
                        store.add_key("race", &hash, "id").ok().map(|_| hash)
                    })
                })
                .collect();
            store.delete_tenant("race").unwrap();
            let added: Vec<TokenHash> = adders
                .into_iter()
                .filter_map(|adder| adder.join().unwrap())
                .collect();
            store.create_tenant("race").unwrap();
            for hash in &added {
                let key = store.key(hash).unwrap();
                assert!(key.is_none(), "round {round}: {key:?} survived");
            }
            assert!(store.keys_of("race").unwrap().is_empty());
            store.delete_tenant("race").unwrap();
        }
    }
}
