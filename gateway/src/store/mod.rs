//! Durable control-plane state behind one [`Store`] trait: tenants, hashed
//! API keys, functions and their immutable versions, content-addressed
//! blobs (wasm and files) and precompiled artifacts, and the models added
//! through the API with their files (stored in parts, so uploads of many
//! gigabytes resume where they stopped).
//!
//! Two backends: [`sled`] (embedded, one process: the default) and
//! [`postgres`] (shared by every node of a cluster). Both store typed,
//! versioned records of their own, never the API's JSON, and make every
//! multi-record change in one transaction. Both report what changed on
//! [`Store::changes`], so that caches in front of them (and other nodes)
//! let go of what a change made stale.

pub mod backup;
mod cache;
mod postgres;
mod records;
mod sled;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::auth::TokenHash;
use crate::manifest::Manifest;
use crate::quota::{Quota, Usage};
use crate::usage::UsageRow;

pub use self::cache::Cached;
pub use self::postgres::PostgresStore;
pub use self::sled::SledStore;

/// A tenant: an isolated namespace of functions and keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Unique name, also the `{tenant}` of `/fn/{tenant}/…`.
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Caps set by the admin.
    pub quota: Quota,
    /// What it uses of its deploy-time caps.
    pub usage: Usage,
    /// Bumped by every change to its keys or functions, in the same
    /// transaction: deleting the tenant checks it did not move while its
    /// keys and functions were being listed.
    pub revision: u64,
    /// Unique to this creation of the name (never reused after a delete),
    /// so a revision of a deleted tenant never matches its successor's.
    pub incarnation: u64,
    /// Set by a deletion before it lists the tenant's keys and functions:
    /// from then on nothing new is stored for the tenant.
    pub deleting: bool,
}

/// An API key record; the key itself is never stored, only its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    /// Public identifier (the first characters of the key), for listing and revoking.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// A function and its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionRecord {
    /// Owning tenant.
    pub tenant: String,
    /// Name within the tenant.
    pub name: String,
    /// The version requests go to.
    pub active: u32,
    /// Every version, oldest first; versions never change.
    pub versions: Vec<Version>,
    /// Unix seconds.
    pub created_at: u64,
}

impl FunctionRecord {
    /// Makes version `number` the active one, if the function has it.
    pub fn activate(&mut self, number: u32) -> Result<(), StoreError> {
        if !self.versions.iter().any(|v| v.number == number) {
            let numbers: Vec<String> = self.versions.iter().map(|v| v.number.to_string()).collect();
            return Err(StoreError::NotFound(format!(
                "{} has no version {number} (it has {})",
                self.name,
                numbers.join(", ")
            )));
        }
        self.active = number;
        Ok(())
    }

    /// The version requests go to.
    pub fn active_version(&self) -> &Version {
        self.versions
            .iter()
            .find(|v| v.number == self.active)
            .expect("the active version is one of the versions")
    }
}

/// One immutable deployed version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// 1, 2, 3 … per function.
    pub number: u32,
    /// sha256 of the wasm, hex.
    pub sha256: String,
    /// Size of the wasm in bytes.
    pub size: u64,
    /// Unix seconds.
    pub deployed_at: u64,
    /// What the function asked for.
    pub manifest: Manifest,
    /// Its read-only files: guest path → content.
    pub files: BTreeMap<String, FileRef>,
}

impl Version {
    /// Bytes this version keeps in the store: its wasm and its files.
    pub fn stored_bytes(&self) -> u64 {
        self.size + self.files.values().map(|f| f.size).sum::<u64>()
    }

    /// Every blob the version references: the wasm, then its files.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.sha256.as_str()).chain(self.files.values().map(|f| f.sha256.as_str()))
    }
}

/// A file's content in the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// sha256 of the content, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Everything a deploy stores.
pub struct NewVersion<'a> {
    /// The component.
    pub wasm: &'a [u8],
    /// Its sha256, hex.
    pub sha256: &'a str,
    /// Its precompiled artifact.
    pub artifact: &'a [u8],
    /// The manifest.
    pub manifest: &'a Manifest,
    /// Guest path → (sha256, content) of each file.
    pub files: BTreeMap<String, (String, &'a [u8])>,
}

impl NewVersion<'_> {
    fn file_refs(&self) -> BTreeMap<String, FileRef> {
        self.files
            .iter()
            .map(|(guest, (sha256, content))| {
                let file = FileRef {
                    sha256: sha256.clone(),
                    size: content.len() as u64,
                };
                (guest.clone(), file)
            })
            .collect()
    }

    fn same_as(&self, version: &Version) -> bool {
        version.sha256 == self.sha256
            && version.manifest == *self.manifest
            && version.files == self.file_refs()
    }

    /// What this deploy makes of function `name` of `owner`, as stored
    /// (`existing`): the same record when it equals the active version,
    /// else the record with a new active version numbered one past the
    /// last, and the tenant's usage after it (refused past its quota).
    fn plan(
        &self,
        owner: &Tenant,
        name: &str,
        existing: Option<FunctionRecord>,
    ) -> Result<Planned, StoreError> {
        if let Some(function) = existing
            .as_ref()
            .filter(|f| self.same_as(f.active_version()))
        {
            return Ok(Planned::Unchanged(function.clone()));
        }
        let now = now();
        let mut function = existing.unwrap_or_else(|| FunctionRecord {
            tenant: owner.name.clone(),
            name: name.to_string(),
            active: 0,
            versions: Vec::new(),
            created_at: now,
        });
        let number = function.versions.last().map_or(1, |v| v.number + 1);
        let version = Version {
            number,
            sha256: self.sha256.to_string(),
            size: self.wasm.len() as u64,
            deployed_at: now,
            manifest: self.manifest.clone(),
            files: self.file_refs(),
        };
        let mut usage = owner.usage;
        usage.functions += u32::from(function.versions.is_empty());
        usage.stored_bytes += version.stored_bytes();
        owner.quota.admits_usage(usage).map_err(StoreError::Quota)?;
        function.versions.push(version);
        function.active = number;
        Ok(Planned::New { function, usage })
    }

    /// Every blob the deploy stores: the wasm, then each file.
    fn blobs(&self) -> impl Iterator<Item = (&str, &[u8])> {
        std::iter::once((self.sha256, self.wasm)).chain(
            self.files
                .values()
                .map(|(sha256, content)| (sha256.as_str(), *content)),
        )
    }
}

/// What a deploy changes.
enum Planned {
    /// Nothing: the function's active version is this one already.
    Unchanged(FunctionRecord),
    /// The function with its new active version, and its tenant's usage.
    New {
        function: FunctionRecord,
        usage: Usage,
    },
}

/// Store refusals the API maps to statuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing exists already.
    #[error("{0}")]
    Conflict(String),
    /// The thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A tenant quota refuses it.
    #[error("{0}")]
    Quota(String),
    /// The store cannot be reached (a restarting database): try again.
    #[error("the store is unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] anyhow::Error),
    /// This store does not do that (the message says what to use instead).
    #[error("{0}")]
    Unsupported(String),
    /// The record changed between a read and the transaction that relied
    /// on it (internal: the caller reads again).
    #[error("the record changed meanwhile")]
    Moved,
}

/// The outcome of a deploy.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The function after the deploy.
    pub function: FunctionRecord,
    /// False when the wasm equals the active version's (nothing changed).
    pub created: bool,
}

/// A model added through the API: its `model.toml` and its files. The
/// operator's models are public or granted by quota; a tenant's private
/// model is seen by that tenant only.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    /// The tenant of a private model; `None` for the operator's.
    pub owner: Option<String>,
    /// Its name (what functions pass to `load-by-name`).
    pub name: String,
    /// 1 when added, one more at each update.
    pub version: u32,
    /// Its `model.toml`.
    pub config: String,
    /// Its files: path in the model's directory → content.
    pub files: BTreeMap<String, FileRef>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last update.
    pub updated_at: u64,
}

impl ModelRecord {
    /// Its key in the model catalog: the name, `tenant/name` when private.
    pub fn key(&self) -> String {
        owned_key(self.owner.as_deref(), &self.name)
    }

    /// Bytes its files take.
    pub fn stored_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
}

/// What adding or updating a model stores.
#[derive(Debug, Clone)]
pub struct NewModel {
    /// The tenant of a private model; `None` for the operator's.
    pub owner: Option<String>,
    /// Its name.
    pub name: String,
    /// Its `model.toml`.
    pub config: String,
    /// Its files, each a verified model blob.
    pub files: BTreeMap<String, FileRef>,
}

/// A model file in the store, uploaded in parts of `part_size` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBlob {
    /// sha256 of the whole file, hex.
    pub sha256: String,
    /// Size of the whole file.
    pub size: u64,
    /// Bytes of every part but the last.
    pub part_size: u64,
    /// The parts stored so far, ascending.
    pub received: Vec<u32>,
    /// Whether the parts were read back whole and matched the sha256.
    pub verified: bool,
}

impl ModelBlob {
    /// How many parts the file has.
    pub fn parts(&self) -> u32 {
        self.size.div_ceil(self.part_size).max(1) as u32
    }

    /// The size part `index` must have.
    pub fn part_len(&self, index: u32) -> u64 {
        let start = u64::from(index) * self.part_size;
        self.size.saturating_sub(start).min(self.part_size)
    }

    /// Whether every part is stored.
    pub fn complete(&self) -> bool {
        self.received.len() as u32 == self.parts()
    }

    /// Refuses to resume it as a file of another size.
    fn resumes(&self, size: u64) -> Result<(), StoreError> {
        if self.size == size {
            return Ok(());
        }
        Err(StoreError::Conflict(format!(
            "the model file {} is being stored with {} bytes, not {size}",
            self.sha256, self.size
        )))
    }

    /// Refuses a part past the end of the file or of the wrong size.
    fn check_part(&self, index: u32, len: usize) -> Result<(), StoreError> {
        if index >= self.parts() {
            return Err(StoreError::Conflict(format!(
                "part {index} of the model file {}: it has {} parts (0 to {})",
                self.sha256,
                self.parts(),
                self.parts() - 1
            )));
        }
        if len as u64 != self.part_len(index) {
            return Err(StoreError::Conflict(format!(
                "part {index} of the model file {} has {len} bytes, not {}",
                self.sha256,
                self.part_len(index)
            )));
        }
        Ok(())
    }
}

impl NewModel {
    /// The record this change makes of the stored one (`existing`).
    fn plan(
        &self,
        existing: Option<&ModelRecord>,
        replace: bool,
    ) -> Result<ModelRecord, StoreError> {
        let now = now();
        let record = |version: u32, created_at: u64| ModelRecord {
            owner: self.owner.clone(),
            name: self.name.clone(),
            version,
            config: self.config.clone(),
            files: self.files.clone(),
            created_at,
            updated_at: now,
        };
        match (existing, replace) {
            (Some(_), false) => Err(StoreError::Conflict(format!(
                "model {:?} exists: update it (`gigafactory models update`)",
                self.name
            ))),
            (None, true) => Err(StoreError::NotFound(format!("no model {:?}", self.name))),
            (Some(old), true) => Ok(record(old.version + 1, old.created_at)),
            (None, false) => Ok(record(1, now)),
        }
    }

    /// The owner's usage with `old` replaced by this model; refused past
    /// its `max_model_bytes` when it grows.
    fn usage_of(&self, owner: &Tenant, old: Option<&ModelRecord>) -> Result<Usage, StoreError> {
        let before = old.map_or(0, ModelRecord::stored_bytes);
        let after: u64 = self.files.values().map(|f| f.size).sum();
        let mut usage = owner.usage;
        usage.model_bytes = usage.model_bytes.saturating_sub(before) + after;
        if after > before {
            owner
                .quota
                .admits_model_bytes(usage.model_bytes)
                .map_err(StoreError::Quota)?;
        }
        Ok(usage)
    }
}

/// Why a model file cannot be used yet.
fn unusable_blob(path: &str, blob: Option<&ModelBlob>) -> Option<StoreError> {
    let why = match blob {
        None => "was never uploaded",
        Some(blob) if !blob.complete() => "is not uploaded whole",
        Some(blob) if !blob.verified => "was not checked against its sha256",
        Some(_) => return None,
    };
    Some(StoreError::Conflict(format!(
        "the model file {path:?} {why}"
    )))
}

/// What `owner` (a tenant; `None`: the operator) calls `name`, as keyed
/// in the catalog and the stores: `name`, or `tenant/name`.
fn owned_key(owner: Option<&str>, name: &str) -> String {
    match owner {
        Some(owner) => gigafactory_runtime::models::private_key(owner, name),
        None => name.to_string(),
    }
}

/// Bytes of each part of a model file (the last may be shorter).
pub const MODEL_PART_BYTES: u64 = 16 << 20;

/// The largest model file the store takes (1 TiB).
pub const MAX_MODEL_FILE_BYTES: u64 = 1 << 40;

/// A node as its heartbeats report it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// Unique in the cluster (`--node-name`).
    pub name: String,
    /// Random per process: tells a restarted node from the one before it,
    /// and two processes given one name apart.
    pub instance: String,
    /// Where other nodes reach it (`--advertise`).
    pub address: String,
    /// The operator's labels (`--label gpu=h200`).
    pub labels: BTreeMap<String, String>,
    /// The build it runs.
    pub version: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Finishing its work before it leaves: takes none.
    pub draining: bool,
    /// What it holds and does (devices, models, requests in flight), shown as-is.
    pub report: serde_json::Value,
}

/// A node and how long ago it was last heard from.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its last heartbeat.
    pub status: NodeStatus,
    /// Time since that heartbeat (by the store's clock, not the nodes').
    pub silent_for: std::time::Duration,
}

/// What a committed change made stale, as announced on [`Store::changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A tenant's record (quota, usage) or its existence.
    Tenant(String),
    /// The key with this hash was added or revoked.
    Key(TokenHash),
    /// A function of a tenant was deployed or deleted.
    Function {
        /// The owning tenant.
        tenant: String,
        /// The function.
        name: String,
    },
    /// A model was added, updated or removed (its catalog key).
    Model(String),
    /// Changes may have been missed (a lost connection): everything
    /// cached may be stale.
    Everything,
}

/// Control-plane state, shared by every request handler (and, with
/// PostgreSQL, by every node).
#[async_trait]
pub trait Store: Send + Sync {
    /// Which backend this is, for logs and `/v1/nodes`.
    fn kind(&self) -> &'static str;

    /// Committed changes, as they happen (with PostgreSQL, also those of
    /// other nodes). A receiver that lags gets `Lagged` and must treat it
    /// as [`Change::Everything`].
    fn changes(&self) -> broadcast::Receiver<Change>;

    /// The admin token's hash, if one was set.
    async fn admin_token(&self) -> Result<Option<TokenHash>, StoreError>;

    /// Sets the admin token's hash.
    async fn set_admin_token(&self, hash: &TokenHash) -> Result<(), StoreError>;

    /// Creates a tenant; a conflict when the name is taken.
    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError>;

    /// A tenant by name.
    async fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError>;

    /// Every tenant, by name.
    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError>;

    /// Replaces a tenant's quota.
    async fn set_quota(&self, name: &str, quota: &Quota) -> Result<Tenant, StoreError>;

    /// Deletes a tenant with its keys and functions (and the blobs only
    /// they used); returns the functions it deleted.
    async fn delete_tenant(&self, name: &str) -> Result<Vec<FunctionRecord>, StoreError>;

    /// Stores a new API key (by hash) for `tenant`.
    async fn add_key(&self, tenant: &str, hash: &TokenHash, id: &str)
    -> Result<ApiKey, StoreError>;

    /// A tenant's keys (ids only), by id.
    async fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes the key of `tenant` with public id `id`.
    async fn revoke_key(&self, tenant: &str, id: &str) -> Result<(), StoreError>;

    /// The key record for a key hash.
    async fn key(&self, hash: &TokenHash) -> Result<Option<ApiKey>, StoreError>;

    /// Records a deploy: the blobs, the artifact, and a new active version
    /// numbered one past the last (unless it equals the active version).
    async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        new: &NewVersion<'_>,
    ) -> Result<Deployed, StoreError>;

    /// A function of `tenant`.
    async fn function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError>;

    /// Every function of `tenant`, by name.
    async fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError>;

    /// Deletes a function and every version; blobs no other version uses go too.
    async fn delete_function(&self, tenant: &str, name: &str) -> Result<(), StoreError>;

    /// Sends a function's requests to its version `number` again (a
    /// rollback, or forward after one); the versions stay as they are.
    async fn activate(
        &self,
        tenant: &str,
        name: &str,
        number: u32,
    ) -> Result<FunctionRecord, StoreError>;

    /// The blob (wasm or file content) with this sha256.
    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The precompiled artifact of a blob for this node's engine.
    async fn artifact(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores a recompiled artifact (after an engine upgrade), if the blob is still live.
    async fn put_artifact(&self, sha256: &str, artifact: &[u8]) -> Result<(), StoreError>;

    /// Drops artifacts no engine of this build can load (embedded store
    /// only: cluster nodes may run other builds); returns how many.
    async fn prune_artifacts(&self) -> Result<usize, StoreError>;

    /// Makes everything acknowledged durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Whether the store answers now (a round trip to the database).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Adds use to the tenants' hourly totals (summed with what other
    /// nodes added), all rows in one transaction.
    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError>;

    /// The hourly totals of `tenant` (every tenant's with `None`) for the
    /// hours starting in `since..until` (Unix seconds), by tenant and hour.
    async fn usage(
        &self,
        tenant: Option<&str>,
        since: u64,
        until: u64,
    ) -> Result<Vec<UsageRow>, StoreError>;

    /// Writes one moment of everything stored (records and blobs, not the
    /// precompiled artifacts a node builds again) to `out` as a backup
    /// archive ([`backup`]), while the store serves: changes wait until it
    /// is written, reads do not.
    async fn backup(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<backup::Summary, StoreError>;

    /// Starts storing the model file `sha256` of `size` bytes for `owner`
    /// (a tenant, or `None`: the operator) in parts of [`MODEL_PART_BYTES`],
    /// or resumes it: what is stored of it so far. Each owner's files are
    /// its own: parts one tenant sends never become part of another's file.
    async fn begin_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> Result<ModelBlob, StoreError>;

    /// A model file of `owner` as stored so far.
    async fn model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
    ) -> Result<Option<ModelBlob>, StoreError>;

    /// Stores part `index` of a model file being uploaded (a part stored
    /// already is left as it is); `NotFound` for a file nobody began,
    /// `Conflict` for a part of the wrong size or past the end.
    async fn put_model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
        content: &[u8],
    ) -> Result<ModelBlob, StoreError>;

    /// Part `index` of a model file.
    async fn model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Records that the file's parts were read back and matched its
    /// sha256 (`true`), or drops the parts that did not (`false`), so the
    /// upload starts again.
    async fn verify_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        matched: bool,
    ) -> Result<(), StoreError>;

    /// Adds a model (`replace` false: `Conflict` when it exists) or stores
    /// a new version of one (`replace` true: `NotFound` when it does not),
    /// in one transaction: every file must be a verified model blob of the
    /// model's owner; a
    /// private model's bytes count against its tenant's `max_model_bytes`;
    /// blobs only the old version used are deleted.
    async fn put_model(&self, model: &NewModel, replace: bool) -> Result<ModelRecord, StoreError>;

    /// A model by owner (`None`: the operator's) and name.
    async fn model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Option<ModelRecord>, StoreError>;

    /// Every model added through the API, the operator's and every tenant's.
    async fn models(&self) -> Result<Vec<ModelRecord>, StoreError>;

    /// Removes a model, and the blobs no other model uses; returns it.
    async fn delete_model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<ModelRecord, StoreError>;

    /// Bytes of the tenant `owner`'s model files no model uses yet
    /// (uploads in progress, or finished and not added).
    async fn pending_model_bytes(&self, owner: &str) -> Result<u64, StoreError>;

    /// Deletes model files no model uses that were last touched before
    /// `before` (Unix seconds): uploads never finished or never added;
    /// returns how many.
    async fn prune_model_blobs(&self, before: u64) -> Result<usize, StoreError>;

    /// Records a node's heartbeat, registering it on the first. A
    /// conflict when another process holds the name and heartbeat within
    /// `taken_within`.
    async fn heartbeat(
        &self,
        node: &NodeStatus,
        taken_within: std::time::Duration,
    ) -> Result<(), StoreError>;

    /// Every node heard from in the last hour, by name.
    async fn nodes(&self) -> Result<Vec<Node>, StoreError>;

    /// Removes a node that left (of this process only).
    async fn leave(&self, node: &NodeStatus) -> Result<(), StoreError>;
}

/// Where the store lives: sled in the data directory, or a PostgreSQL URL.
pub async fn open(
    spec: Option<&str>,
    data_dir: &Path,
    fingerprint: &str,
) -> Result<std::sync::Arc<dyn Store>> {
    match spec {
        None | Some("sled") => Ok(std::sync::Arc::new(SledStore::open(
            &data_dir.join("store"),
            fingerprint,
        )?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(
            std::sync::Arc::new(PostgresStore::connect(url, fingerprint).await?),
        ),
        Some(other) => anyhow::bail!(
            "unknown store {other:?}: use `sled` (the default, in the data directory) or a \
             `postgres://user:password@host:port/database` URL"
        ),
    }
}

/// Changes kept for receivers that fall behind before they are told they lagged.
const CHANGES_BUFFERED: usize = 1024;

/// Unix seconds now.
pub fn unix_now() -> u64 {
    now()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
