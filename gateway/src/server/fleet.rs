//! Models added through the API, on this node.
//!
//! The store holds each model (its record, `model.toml` and files in
//! parts), so every node of a cluster serves the same models. A node keeps
//! a copy of the files it needs under `<data>/models/blobs/` (each checked
//! against its sha256 as it is written) and lays each model version out as
//! a directory of hard links under `<data>/models/installed/`, which the
//! model pool reads like a repository directory. The catalog follows the
//! store: at start, on every change the store announces (other nodes'
//! too), and at once after a change made through this node. `SIGHUP`
//! rereads the repository directory (`--models`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use gigafactory_runtime::models::Origin;
use sha2::{Digest as _, Sha256};
use tokio::sync::broadcast;

use super::Gateway;
use crate::store::{Change, FileRef, ModelBlob, ModelRecord};

/// Uploads left unfinished (or finished and never added) this long are deleted.
const UNFINISHED_UPLOADS_KEPT: u64 = 24 * 3600;

/// Copies of files no model uses yet are kept this long (a model being
/// added fetches its files before the store has its record).
const FRESH_COPIES_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

/// This node's copy of the models added through the API.
pub(super) struct Fleet {
    /// `<data>/models`.
    dir: PathBuf,
    /// What the catalog holds of them: key → the record installed. Held
    /// while syncing, so syncs run one at a time.
    installed: tokio::sync::Mutex<BTreeMap<String, ModelRecord>>,
    /// Held while a file is fetched from the store: one copy at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl Fleet {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            installed: tokio::sync::Mutex::default(),
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// Where the file `sha256` of `owner` is kept on this node.
    pub(super) fn blob_path(&self, owner: Option<&str>, sha256: &str) -> PathBuf {
        self.dir
            .join("blobs")
            .join(owner.unwrap_or("_operator"))
            .join(sha256)
    }

    /// The directory of one version of a model, named by its version and
    /// its content (a model removed and added again starts at version 1
    /// again, with other files).
    fn version_dir(&self, record: &ModelRecord) -> PathBuf {
        let mut content = Sha256::new();
        content.update(record.config.as_bytes());
        for (path, file) in &record.files {
            content.update(format!("\n{path} {} {}", file.sha256, file.size));
        }
        let content = hex::encode(content.finalize());
        self.dir
            .join("installed")
            .join(record.key().replace('/', "~"))
            .join(format!("v{}-{}", record.version, &content[..16]))
    }
}

impl Gateway {
    /// Brings the catalog in step with the store's models: fetches the
    /// files of new versions, installs them (a new version takes over from
    /// the old one without failing a call) and removes what the store no
    /// longer has. A model whose files cannot be fetched is logged and
    /// tried again at the next sync.
    pub(super) async fn sync_models(&self) -> Result<()> {
        let mut installed = self.fleet.installed.lock().await;
        let records = self.store.models().await?;
        let pool = self.runtime.models();
        let mut wanted = BTreeSet::new();
        for record in &records {
            let key = record.key();
            wanted.insert(key.clone());
            if installed.get(&key) == Some(record) {
                continue;
            }
            if pool.origin(&key) == Some(Origin::Directory) {
                tracing::error!(model = %key, "a model of the repository directory has this name: the one added through the API is not served");
                continue;
            }
            let dir = match self.lay_out(record).await {
                Ok(dir) => dir,
                Err(error) => {
                    tracing::error!(model = %key, "fetching the model's files: {error:#}");
                    continue;
                }
            };
            let origin = Origin::Api {
                version: record.version,
            };
            let outcome = pool.install(&key, &dir, origin).await;
            if let Err(error) = &outcome {
                tracing::error!(model = %key, "installing the model: {error:#}");
            }
            // What the catalog holds now, even when a step after the
            // install failed (loading its base again, say).
            if pool.origin(&key) == Some(origin) {
                installed.insert(key, record.clone());
            }
        }
        // Gone from the store: what was installed, and any model added
        // through the API the catalog still has.
        let mut gone: BTreeSet<String> = installed
            .keys()
            .filter(|key| !wanted.contains(*key))
            .cloned()
            .collect();
        gone.extend(
            pool.list()
                .into_iter()
                .filter(|m| matches!(m.origin, Origin::Api { .. }))
                .map(|m| m.key())
                .filter(|key| !wanted.contains(key)),
        );
        for key in gone {
            installed.remove(&key);
            pool.remove(&key).await;
        }
        {
            // Not while a file is being fetched (for a model being added);
            // the files of what the catalog serves are kept, even when the
            // store has a newer version that could not be installed.
            let _fetching = self.fleet.fetching.lock().await;
            let serving: Vec<ModelRecord> = installed.values().cloned().collect();
            self.collect_garbage(&serving);
        }
        self.public_models_changed();
        Ok(())
    }

    /// Tells the cluster view which models are public here now.
    pub(super) fn public_models_changed(&self) {
        let public = self
            .runtime
            .models()
            .list()
            .into_iter()
            .filter(|m| m.public)
            .map(|m| m.name)
            .collect();
        self.peers.set_public_here(public);
    }

    /// The directory of `record`'s version: its `model.toml` and a hard
    /// link to each file (fetched from the store first if this node does
    /// not have it).
    async fn lay_out(&self, record: &ModelRecord) -> Result<PathBuf> {
        let dir = self.fleet.version_dir(record);
        if dir.join("model.toml").is_file() {
            return Ok(dir);
        }
        let owner = record.owner.as_deref();
        let staging = dir.with_extension("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        for (path, file) in &record.files {
            let blob = self.fetch_blob(owner, file).await?;
            let target = staging.join(safe_path(path)?);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::hard_link(&blob, &target)
                .or_else(|_| std::fs::copy(&blob, &target).map(|_| ()))
                .with_context(|| format!("placing {}", target.display()))?;
        }
        std::fs::write(staging.join("model.toml"), &record.config)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging, &dir)
            .with_context(|| format!("moving {} into place", dir.display()))?;
        Ok(dir)
    }

    /// This node's copy of a model file: fetched from the store part by
    /// part into a temporary file, checked against its sha256, then moved
    /// into place. Blocking file work runs off the async workers.
    pub(super) async fn fetch_blob(&self, owner: Option<&str>, file: &FileRef) -> Result<PathBuf> {
        let path = self.fleet.blob_path(owner, &file.sha256);
        let _fetching = self.fleet.fetching.lock().await;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == file.size) {
            return Ok(path);
        }
        let blob = self
            .store
            .model_blob(owner, &file.sha256)
            .await?
            .with_context(|| format!("the store has no model file {}", file.sha256))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let out = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let digest = self.read_blob(owner, &blob, Some(out)).await;
        match digest {
            Ok(digest) if digest == file.sha256 => {
                std::fs::rename(&partial, &path)
                    .with_context(|| format!("moving {} into place", path.display()))?;
                Ok(path)
            }
            outcome => {
                let _ = std::fs::remove_file(&partial);
                let digest = outcome?;
                Err(Mismatch::new(&file.sha256, &digest).into())
            }
        }
    }

    /// Reads a stored model file part by part, hashing it (and writing it
    /// to `out`, synced, when given) off the async workers; its sha256, hex.
    pub(super) async fn read_blob(
        &self,
        owner: Option<&str>,
        blob: &ModelBlob,
        mut out: Option<std::fs::File>,
    ) -> Result<String> {
        let mut hasher = Sha256::new();
        for index in 0..blob.parts() {
            let part = self
                .store
                .model_part(owner, &blob.sha256, index)
                .await?
                .with_context(|| {
                    format!("part {index} of the model file {} is missing", blob.sha256)
                })?;
            (hasher, out) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                hasher.update(&part);
                if let Some(out) = &mut out {
                    std::io::Write::write_all(out, &part)?;
                }
                Ok((hasher, out))
            })
            .await
            .context("hashing a part")??;
        }
        if let Some(out) = out {
            tokio::task::spawn_blocking(move || out.sync_all())
                .await
                .context("syncing")??;
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Deletes the version directories and the file copies no current
    /// model uses (a model still loaded from them keeps its open files),
    /// except copies made lately: a model being added fetches its files
    /// before the store has its record.
    fn collect_garbage(&self, records: &[ModelRecord]) {
        let current: BTreeSet<PathBuf> =
            records.iter().map(|r| self.fleet.version_dir(r)).collect();
        let installed = self.fleet.dir.join("installed");
        for model in read_dirs(&installed) {
            for version in read_dirs(&model) {
                if !current.contains(&version) {
                    let _ = std::fs::remove_dir_all(&version);
                }
            }
            let _ = std::fs::remove_dir(&model);
        }
        let used: BTreeSet<PathBuf> = records
            .iter()
            .flat_map(|r| {
                r.files
                    .values()
                    .map(|f| self.fleet.blob_path(r.owner.as_deref(), &f.sha256))
            })
            .collect();
        for owner in read_dirs(&self.fleet.dir.join("blobs")) {
            for blob in read_dirs(&owner) {
                let recent = std::fs::metadata(&blob)
                    .and_then(|m| m.modified())
                    .is_ok_and(|at| at.elapsed().is_ok_and(|age| age < FRESH_COPIES_KEPT));
                if !used.contains(&blob) && !recent {
                    let _ = std::fs::remove_file(&blob);
                }
            }
            let _ = std::fs::remove_dir(&owner);
        }
    }

    /// Follows the store's changes to models (other nodes' too) and
    /// `SIGHUP`, for as long as the gateway lives. Also deletes uploads
    /// left unfinished, at start and daily.
    pub(super) fn follow_models(self: &Arc<Self>) {
        let mut changes = self.store.changes();
        let gateway = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = changes.recv().await;
                let Some(gateway) = gateway.upgrade() else {
                    return;
                };
                let relevant = match change {
                    Ok(Change::Model(_) | Change::Everything)
                    | Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Ok(_) => false,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if relevant && let Err(error) = gateway.sync_models().await {
                    tracing::warn!("following the store's models: {error:#}");
                }
            }
        });
        let gateway = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut day = tokio::time::interval(std::time::Duration::from_secs(24 * 3600));
            loop {
                day.tick().await;
                let Some(gateway) = gateway.upgrade() else {
                    return;
                };
                let before = crate::store::unix_now().saturating_sub(UNFINISHED_UPLOADS_KEPT);
                match gateway.store.prune_model_blobs(before).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, "deleted unfinished model uploads"),
                    Err(error) => tracing::warn!("deleting unfinished model uploads: {error:#}"),
                }
            }
        });
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                return;
            };
            let gateway = Arc::downgrade(self);
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    let Some(gateway) = gateway.upgrade() else {
                        return;
                    };
                    gateway.rescan_repository().await;
                }
            });
        }
    }

    /// Rereads the repository directory (`SIGHUP`, `POST /v1/models:rescan`).
    pub(super) async fn rescan_repository(&self) -> Option<gigafactory_runtime::models::Rescan> {
        match self.runtime.models().rescan().await {
            Ok(rescan) => {
                tracing::info!(
                    added = ?rescan.added,
                    replaced = ?rescan.replaced,
                    removed = ?rescan.removed,
                    "reread the model repository"
                );
                self.public_models_changed();
                Some(rescan)
            }
            Err(error) => {
                tracing::error!("rereading the model repository: {error:#}");
                None
            }
        }
    }
}

/// A stored model file whose content does not match its sha256.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Mismatch(String);

impl Mismatch {
    pub(super) fn new(expected: &str, read: &str) -> Self {
        Self(format!(
            "the file read back from the store has sha256 {read}, not {expected}"
        ))
    }
}

/// A model file's path inside its directory, refused unless it is plain:
/// relative, of `A-Za-z0-9._-` components not starting with `.`.
pub(super) fn safe_path(path: &str) -> Result<&Path> {
    let plain = !path.is_empty()
        && path.len() <= 200
        && path.split('/').count() <= 4
        && path.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        && path != "model.toml";
    if !plain {
        bail!(
            "{path:?} is not a plain file path: use up to 4 components of A-Z, a-z, 0-9, '.', '_' \
             and '-', none starting with '.', and not model.toml"
        );
    }
    Ok(Path::new(path))
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}
