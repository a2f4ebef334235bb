//! A version's read-only files, written out once under
//! `<data>/files/<id>` (the id hashes the guest-path → content mapping, so
//! versions with the same files share a directory) and mounted as the
//! guest's `/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};

use super::{ApiError, Gateway};
use crate::store::{FileRef, Version};

impl Gateway {
    /// The directory holding `version`'s files, written on first use.
    pub(super) async fn function_files(
        &self,
        version: &Version,
    ) -> Result<Option<PathBuf>, ApiError> {
        if version.files.is_empty() {
            return Ok(None);
        }
        let root = self.config.data_dir.join("files");
        let dir = root.join(files_id(&version.files));
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        let mut contents = Vec::with_capacity(version.files.len());
        for (guest, file) in &version.files {
            let content = self.store.blob(&file.sha256).await?.ok_or_else(|| {
                ApiError::internal(anyhow::anyhow!(
                    "the content of {guest} is missing from the store"
                ))
            })?;
            contents.push((guest.clone(), content));
        }
        let target = dir.clone();
        tokio::task::spawn_blocking(move || materialize(&contents, &root, &target))
            .await
            .map_err(|e| ApiError::internal(e.into()))??;
        Ok(Some(dir))
    }
}

/// Removes staging directories a crash left behind.
pub(super) fn remove_staging(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".staging-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn files_id(files: &BTreeMap<String, FileRef>) -> String {
    let mut hash = Sha256::new();
    for (guest, file) in files {
        hash.update(guest.as_bytes());
        hash.update([0]);
        hash.update(file.sha256.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..16])
}

/// Writes the files into a staging directory, then renames it into place
/// so a concurrent reader never sees half a tree.
fn materialize(files: &[(String, Vec<u8>)], root: &Path, target: &Path) -> Result<()> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let staging = root.join(format!(".staging-{}", hex::encode(nonce)));
    if let Err(error) = write_files(files, &staging) {
        // A failed write leaves nothing behind on disk.
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    match std::fs::rename(&staging, target) {
        Ok(()) => Ok(()),
        Err(_) if target.is_dir() => {
            std::fs::remove_dir_all(&staging)?;
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e).with_context(|| format!("moving the files into {}", target.display()))
        }
    }
}

fn write_files(files: &[(String, Vec<u8>)], staging: &Path) -> Result<()> {
    for (guest, content) in files {
        // Guest paths were validated at deploy: absolute, no `.` or `..`,
        // no file inside another.
        let path = staging.join(guest.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().expect("a file has a parent"))?;
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
