//! What every request reads — the key it presents, its tenant, the
//! function it calls — kept in memory in front of a [`Store`].
//!
//! An entry goes stale three ways, and each is handled:
//! - a write through this node: the write drops what it changed before it
//!   returns, so this node reads its own writes;
//! - a write on another node: the store's change feed (PostgreSQL
//!   `NOTIFY`) drops a key at once and makes other records stale (read
//!   again before they are trusted), normally within milliseconds; a lost feed
//!   (`Change::Everything`, a lagging receiver) makes every entry stale,
//!   to be read again before it is trusted;
//! - a missed change despite both: no entry is trusted for longer than
//!   [`MAX_AGE`]; past it, the next read goes to the store.
//!
//! When the store cannot be reached, a read is answered from the entry it
//! has, however old: the data plane keeps serving through a database
//! restart, and only writes fail (with `Unavailable`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    ApiKey, Change, Deployed, FunctionRecord, ModelBlob, ModelRecord, NewModel, NewVersion, Node,
    NodeStatus, Store, StoreError, Tenant,
};
use crate::auth::TokenHash;
use crate::quota::Quota;
use crate::usage::UsageRow;

/// Longest an entry is served without asking the store again.
pub const MAX_AGE: Duration = Duration::from_secs(10);

/// Entries per map; past it the map starts over (unknown keys are cached
/// too, and a client may present any number of them).
const MAX_ENTRIES: usize = 100_000;

/// A [`Store`] with the request path's reads cached.
pub struct Cached {
    inner: Arc<dyn Store>,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Bumped by every invalidation: a read that started before one does
    /// not fill the cache with what it read.
    epoch: AtomicU64,
    keys: Map<[u8; 32], ApiKey>,
    tenants: Map<String, Tenant>,
    functions: Map<(String, String), FunctionRecord>,
}

impl Cached {
    /// Caches `inner`, following its change feed for as long as it lives.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        let state = Arc::new(State::default());
        let follower = Arc::downgrade(&state);
        let mut changes = inner.changes();
        tokio::spawn(async move {
            loop {
                let change = match changes.recv().await {
                    Ok(change) => change,
                    Err(broadcast::error::RecvError::Lagged(_)) => Change::Everything,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(state) = follower.upgrade() else {
                    return;
                };
                state.forget(&change);
            }
        });
        Self { inner, state }
    }

    /// A cached read: fresh entry, else the store, else (store
    /// unavailable) whatever entry there is.
    async fn read<K, V, F>(
        &self,
        map: impl Fn(&State) -> &Map<K, V>,
        key: K,
        fetch: impl FnOnce() -> F,
    ) -> Result<Option<V>, StoreError>
    where
        K: Hash + Eq,
        V: Clone,
        F: Future<Output = Result<Option<V>, StoreError>>,
    {
        let cached = map(&self.state).get(&key);
        if let Some((value, Some(fetched))) = &cached
            && fetched.elapsed() < MAX_AGE
        {
            return Ok(value.clone());
        }
        let epoch = self.state.epoch.load(Ordering::Acquire);
        match fetch().await {
            Ok(value) => {
                map(&self.state).fill(key, value.clone(), || {
                    self.state.epoch.load(Ordering::Acquire) == epoch
                });
                Ok(value)
            }
            Err(StoreError::Unavailable(error)) => match cached {
                Some((value, _)) => {
                    tracing::debug!("serving a cached record: {error:#}");
                    Ok(value)
                }
                None => Err(StoreError::Unavailable(error)),
            },
            Err(error) => Err(error),
        }
    }
}

impl State {
    fn forget(&self, change: &Change) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        match change {
            Change::Key(hash) => {
                let hash: [u8; 32] = hash.as_bytes().try_into().expect("32 bytes");
                self.keys.remove(|key, _| *key == hash);
            }
            // A revoked or added key goes at once. The rest turns stale:
            // read again before it is trusted, kept for when the store
            // cannot be reached (as after a lost feed).
            Change::Tenant(tenant) => {
                self.tenants.expire(|name, _| name == tenant);
                self.functions.expire(|(owner, _), _| owner == tenant);
                self.keys
                    .expire(|_, key| key.as_ref().is_some_and(|k| k.tenant == *tenant));
            }
            Change::Function { tenant, name } => {
                self.functions
                    .expire(|(owner, function), _| owner == tenant && function == name);
            }
            // Models are not cached here: each node's catalog follows them.
            Change::Model(_) => {}
            Change::Everything => {
                self.keys.expire_all();
                self.tenants.expire_all();
                self.functions.expire_all();
            }
        }
    }
}

/// One cache: a value (or its absence) and when it was read (`None`:
/// stale, kept only for when the store cannot be reached).
struct Map<K, V>(Mutex<HashMap<K, Entry<V>>>);

type Entry<V> = (Option<V>, Option<Instant>);

impl<K, V> Default for Map<K, V> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq, V: Clone> Map<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<V>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &K) -> Option<Entry<V>> {
        self.lock().get(key).cloned()
    }

    /// Stores what a read found: fresh, unless `still_current` says an
    /// invalidation came after the read began (checked under the lock that
    /// invalidations take); then stale, read again before it is trusted
    /// but better than nothing while the store is unreachable.
    fn fill(&self, key: K, value: Option<V>, still_current: impl Fn() -> bool) {
        let mut map = self.lock();
        let fetched = still_current().then(Instant::now);
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, (value, fetched));
    }

    fn remove(&self, matches: impl Fn(&K, &Option<V>) -> bool) {
        self.lock().retain(|key, (value, _)| !matches(key, value));
    }

    fn expire(&self, matches: impl Fn(&K, &Option<V>) -> bool) {
        for (key, (value, fetched)) in self.lock().iter_mut() {
            if matches(key, value) {
                *fetched = None;
            }
        }
    }

    fn expire_all(&self) {
        for (_, fetched) in self.lock().values_mut() {
            *fetched = None;
        }
    }
}

#[async_trait]
impl Store for Cached {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes()
    }

    async fn admin_token(&self) -> Result<Option<TokenHash>, StoreError> {
        self.inner.admin_token().await
    }

    async fn set_admin_token(&self, hash: &TokenHash) -> Result<(), StoreError> {
        self.inner.set_admin_token(hash).await
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let outcome = self.inner.create_tenant(name).await;
        self.state.forget(&Change::Tenant(name.to_string()));
        outcome
    }

    async fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.read(|s| &s.tenants, name.to_string(), || self.inner.tenant(name))
            .await
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.inner.tenants().await
    }

    async fn set_quota(&self, name: &str, quota: &Quota) -> Result<Tenant, StoreError> {
        let outcome = self.inner.set_quota(name, quota).await;
        self.state.forget(&Change::Tenant(name.to_string()));
        outcome
    }

    async fn delete_tenant(&self, name: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        let outcome = self.inner.delete_tenant(name).await;
        self.state.forget(&Change::Tenant(name.to_string()));
        outcome
    }

    async fn add_key(
        &self,
        tenant: &str,
        hash: &TokenHash,
        id: &str,
    ) -> Result<ApiKey, StoreError> {
        let outcome = self.inner.add_key(tenant, hash, id).await;
        self.state.forget(&Change::Key(hash.clone()));
        outcome
    }

    async fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>, StoreError> {
        self.inner.keys_of(tenant).await
    }

    async fn revoke_key(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        let outcome = self.inner.revoke_key(tenant, id).await;
        // The revoked key's hash is not known here: every key of the tenant goes.
        self.state.forget(&Change::Tenant(tenant.to_string()));
        outcome
    }

    async fn key(&self, hash: &TokenHash) -> Result<Option<ApiKey>, StoreError> {
        let bytes: [u8; 32] = hash.as_bytes().try_into().expect("32 bytes");
        self.read(|s| &s.keys, bytes, || self.inner.key(hash)).await
    }

    async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        new: &NewVersion<'_>,
    ) -> Result<Deployed, StoreError> {
        let outcome = self.inner.deploy(tenant, name, new).await;
        self.state.forget(&Change::Tenant(tenant.to_string()));
        outcome
    }

    async fn function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError> {
        self.read(
            |s| &s.functions,
            (tenant.to_string(), name.to_string()),
            || self.inner.function(tenant, name),
        )
        .await
    }

    async fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        self.inner.functions(tenant).await
    }

    async fn delete_function(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        let outcome = self.inner.delete_function(tenant, name).await;
        self.state.forget(&Change::Tenant(tenant.to_string()));
        outcome
    }

    async fn activate(
        &self,
        tenant: &str,
        name: &str,
        number: u32,
    ) -> Result<FunctionRecord, StoreError> {
        let outcome = self.inner.activate(tenant, name, number).await;
        self.state.forget(&Change::Tenant(tenant.to_string()));
        outcome
    }

    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.blob(sha256).await
    }

    async fn artifact(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.artifact(sha256).await
    }

    async fn put_artifact(&self, sha256: &str, artifact: &[u8]) -> Result<(), StoreError> {
        self.inner.put_artifact(sha256, artifact).await
    }

    async fn prune_artifacts(&self) -> Result<usize, StoreError> {
        self.inner.prune_artifacts().await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        self.inner.add_usage(rows).await
    }

    async fn usage(
        &self,
        tenant: Option<&str>,
        since: u64,
        until: u64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        self.inner.usage(tenant, since, until).await
    }

    async fn backup(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<super::backup::Summary, StoreError> {
        self.inner.backup(out).await
    }

    async fn begin_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> Result<ModelBlob, StoreError> {
        self.inner.begin_model_blob(owner, sha256, size).await
    }

    async fn model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
    ) -> Result<Option<ModelBlob>, StoreError> {
        self.inner.model_blob(owner, sha256).await
    }

    async fn put_model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
        content: &[u8],
    ) -> Result<ModelBlob, StoreError> {
        self.inner
            .put_model_part(owner, sha256, index, content)
            .await
    }

    async fn model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.model_part(owner, sha256, index).await
    }

    async fn verify_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        matched: bool,
    ) -> Result<(), StoreError> {
        self.inner.verify_model_blob(owner, sha256, matched).await
    }

    async fn put_model(&self, model: &NewModel, replace: bool) -> Result<ModelRecord, StoreError> {
        let outcome = self.inner.put_model(model, replace).await;
        if let Some(owner) = &model.owner {
            self.state.forget(&Change::Tenant(owner.clone()));
        }
        outcome
    }

    async fn model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Option<ModelRecord>, StoreError> {
        self.inner.model(owner, name).await
    }

    async fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        self.inner.models().await
    }

    async fn delete_model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<ModelRecord, StoreError> {
        let outcome = self.inner.delete_model(owner, name).await;
        if let Some(owner) = owner {
            self.state.forget(&Change::Tenant(owner.to_string()));
        }
        outcome
    }

    async fn pending_model_bytes(&self, owner: &str) -> Result<u64, StoreError> {
        self.inner.pending_model_bytes(owner).await
    }

    async fn prune_model_blobs(&self, before: u64) -> Result<usize, StoreError> {
        self.inner.prune_model_blobs(before).await
    }

    async fn heartbeat(&self, node: &NodeStatus, taken_within: Duration) -> Result<(), StoreError> {
        self.inner.heartbeat(node, taken_within).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.inner.nodes().await
    }

    async fn leave(&self, node: &NodeStatus) -> Result<(), StoreError> {
        self.inner.leave(node).await
    }
}
