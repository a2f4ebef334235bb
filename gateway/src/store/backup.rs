//! Backups of the embedded store: one tar archive (`tar tf` lists it)
//! holding one moment of every record and blob:
//!
//! - `gigafactory-backup.json`: the format, when, which build, first;
//! - `records/<tree>.jsonl`: a record tree, one `{"key":hex,"value":hex}`
//!   line per record, as the store keeps it (typed, versioned records);
//! - `blobs/<tree>/<hex key>`: one entry per blob (wasm and files, model
//!   file parts);
//! - `end.json`: what the archive holds, last: an archive without it was
//!   cut short, and one whose contents differ from it is refused.
//!
//! Precompiled artifacts are left out (a node compiles them again), as
//! are the in-memory node heartbeats. A restore goes into a new data
//! directory, checks every entry (each wasm and file blob against its
//! sha256, every function's blobs present) and moves the store into place
//! only when all of it was read.
//!
//! A PostgreSQL store is backed up with PostgreSQL's own tools
//! (`pg_dump`): it holds every record and blob in its tables.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::FunctionRecord;
use super::records::decode;

/// The archive layout this build writes and reads.
pub const FORMAT: u32 = 1;

/// Trees backed up record by record.
pub(super) const RECORD_TREES: &[&str] = &[
    "meta",
    "tenants",
    "keys",
    "functions",
    "blob_refs",
    "models",
    "model_blobs",
    "usage",
];

/// Trees of blobs, one archive entry per blob.
pub(super) const BLOB_TREES: &[&str] = &["blobs", "model_parts"];

/// Trees left out: what a node derives again.
pub(super) const DERIVED_TREES: &[&str] = &["artifacts"];

const HEADER: &str = "gigafactory-backup.json";
const END: &str = "end.json";

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    /// Unix seconds.
    created_at: u64,
    /// The build that wrote it.
    gigafactory: String,
}

/// What a backup holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Tenants.
    pub tenants: u64,
    /// API keys.
    pub keys: u64,
    /// Functions (with all their versions).
    pub functions: u64,
    /// Models added through the API.
    pub models: u64,
    /// Blobs (wasm, files and model file parts).
    pub blobs: u64,
    /// Bytes of those blobs.
    pub blob_bytes: u64,
    /// Records per tree, as written.
    pub records: BTreeMap<String, u64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tenants, {} keys, {} functions, {} models, {} blobs ({} bytes)",
            self.tenants, self.keys, self.functions, self.models, self.blobs, self.blob_bytes
        )
    }
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    value: String,
}

/// Writes `db` to `out` as an archive. The caller keeps the store's
/// writers out meanwhile, so that the archive is one moment.
pub(super) fn write(db: &sled::Db, out: impl Write) -> Result<Summary> {
    // A tree this build does not list would be missing from the backup.
    for name in db.tree_names() {
        let name = String::from_utf8_lossy(&name);
        let listed = [RECORD_TREES, BLOB_TREES, DERIVED_TREES]
            .iter()
            .any(|trees| trees.contains(&name.as_ref()));
        ensure!(
            listed || name == "__sled__default",
            "the store has a tree {name:?} that no backup list names: it cannot be backed up whole"
        );
    }
    let now = super::now();
    let mut archive = tar::Builder::new(out);
    let entry = |archive: &mut tar::Builder<_>, path: &str, data: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(now);
        header.set_entry_type(tar::EntryType::Regular);
        archive
            .append_data(&mut header, path, data)
            .with_context(|| format!("writing {path}"))
    };
    let header = Header {
        format: FORMAT,
        created_at: now,
        gigafactory: env!("CARGO_PKG_VERSION").to_string(),
    };
    entry(&mut archive, HEADER, &serde_json::to_vec_pretty(&header)?)?;
    let mut summary = Summary::default();
    for name in RECORD_TREES {
        let tree = db.open_tree(name)?;
        let mut lines = Vec::new();
        let mut count = 0;
        for record in tree.iter() {
            let (key, value) = record?;
            let line = Line {
                key: hex::encode(&key),
                value: hex::encode(&value),
            };
            serde_json::to_writer(&mut lines, &line)?;
            lines.push(b'\n');
            count += 1;
        }
        entry(&mut archive, &format!("records/{name}.jsonl"), &lines)?;
        summary.records.insert(name.to_string(), count);
    }
    for name in BLOB_TREES {
        let tree = db.open_tree(name)?;
        let mut count = 0;
        for blob in tree.iter() {
            let (key, value) = blob?;
            entry(
                &mut archive,
                &format!("blobs/{name}/{}", hex::encode(&key)),
                &value,
            )?;
            summary.blobs += 1;
            summary.blob_bytes += value.len() as u64;
            count += 1;
        }
        summary.records.insert(name.to_string(), count);
    }
    summary.count_records();
    entry(&mut archive, END, &serde_json::to_vec_pretty(&summary)?)?;
    archive.into_inner()?.flush()?;
    Ok(summary)
}

impl Summary {
    fn count_records(&mut self) {
        let count = |tree: &str| self.records.get(tree).copied().unwrap_or(0);
        self.tenants = count("tenants");
        self.keys = count("keys");
        self.functions = count("functions");
        self.models = count("models");
    }
}

/// Reads an archive, checking it whole, and gives each record and blob to
/// `put(tree, key, value)`; returns what it held.
pub(super) fn read(
    input: impl Read,
    mut put: impl FnMut(&str, &[u8], &[u8]) -> Result<()>,
) -> Result<Summary> {
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries().context("reading the archive")?;
    let mut first = entries
        .next()
        .context("the file is empty: not a backup")?
        .context("reading the archive (is the file a backup made by `gigafactory backup`?)")?;
    let path = entry_path(&first)?;
    ensure!(
        path == HEADER,
        "not a backup made by `gigafactory backup`: it begins with {path:?}, not {HEADER}"
    );
    let header: Header =
        serde_json::from_reader(&mut first).with_context(|| format!("reading {HEADER}"))?;
    ensure!(
        header.format == FORMAT,
        "the backup's format is {} (written by gigafactory {}); this build reads format {FORMAT}",
        header.format,
        header.gigafactory
    );
    let mut read = Summary::default();
    let mut end: Option<Summary> = None;
    for entry in entries {
        let mut entry = entry.context("reading the archive")?;
        let path = entry_path(&entry)?;
        ensure!(
            end.is_none(),
            "{path} follows {END}: the archive is not one backup"
        );
        if path == END {
            end = Some(
                serde_json::from_reader(&mut entry).with_context(|| format!("reading {END}"))?,
            );
        } else if let Some(tree) = path
            .strip_prefix("records/")
            .and_then(|p| p.strip_suffix(".jsonl"))
        {
            ensure!(
                RECORD_TREES.contains(&tree),
                "{path}: no record tree {tree:?} (this build has {})",
                RECORD_TREES.join(", ")
            );
            let mut count = 0;
            for line in BufReader::new(&mut entry).lines() {
                let line = line.with_context(|| format!("reading {path}"))?;
                let line: Line = serde_json::from_str(&line)
                    .with_context(|| format!("{path}: record {}", count + 1))?;
                let key = hex::decode(&line.key).with_context(|| format!("{path}: a key"))?;
                let value = hex::decode(&line.value).with_context(|| format!("{path}: a value"))?;
                put(tree, &key, &value)?;
                count += 1;
            }
            read.records.insert(tree.to_string(), count);
        } else if let Some((tree, key)) =
            path.strip_prefix("blobs/").and_then(|p| p.split_once('/'))
        {
            ensure!(
                BLOB_TREES.contains(&tree),
                "{path}: no blob tree {tree:?} (this build has {})",
                BLOB_TREES.join(", ")
            );
            let key =
                hex::decode(key).with_context(|| format!("{path}: the name is not a hex key"))?;
            let mut value = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut value)
                .with_context(|| format!("reading {path}"))?;
            if tree == "blobs" {
                // Content-addressed: the key is the content's sha256.
                let sha256 = hex::encode(Sha256::digest(&value));
                ensure!(
                    key == sha256.as_bytes(),
                    "{path}: the content's sha256 is {sha256}: the blob is damaged"
                );
            }
            put(tree, &key, &value)?;
            *read.records.entry(tree.to_string()).or_default() += 1;
            read.blobs += 1;
            read.blob_bytes += value.len() as u64;
        } else {
            bail!("{path}: not an entry of a backup");
        }
    }
    let end = end.with_context(|| format!("the backup was cut short: it has no {END}"))?;
    for tree in BLOB_TREES {
        read.records.entry(tree.to_string()).or_default();
    }
    read.count_records();
    ensure!(
        read == end,
        "the backup holds {read}, but says it holds {end}: it is damaged"
    );
    Ok(read)
}

fn entry_path(entry: &tar::Entry<'_, impl Read>) -> Result<String> {
    Ok(entry
        .path()
        .context("an entry's name")?
        .to_string_lossy()
        .into_owned())
}

/// Restores the archive `input` into a new store at `dir` (it must not
/// hold one). The store is built beside it and moved into place once the
/// whole archive was read and checked, so a failed restore leaves nothing.
pub fn restore(dir: &Path, input: impl Read) -> Result<Summary> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} already holds a store: restore into a new data directory",
            dir.display()
        );
    }
    let building = dir.with_extension("restoring");
    if building.exists() {
        std::fs::remove_dir_all(&building)
            .with_context(|| format!("removing {} (an earlier restore)", building.display()))?;
    }
    let summary = match build(&building, input) {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(error);
        }
    };
    if dir.exists() {
        std::fs::remove_dir(dir)?;
    }
    std::fs::rename(&building, dir)
        .with_context(|| format!("moving the restored store to {}", dir.display()))?;
    Ok(summary)
}

/// Builds the store at `path` from the archive `input`.
fn build(path: &Path, input: impl Read) -> Result<Summary> {
    let db = sled::open(path).with_context(|| format!("creating a store in {}", path.display()))?;
    let mut trees: BTreeMap<String, sled::Tree> = BTreeMap::new();
    let summary = read(input, |name, key, value| {
        if !trees.contains_key(name) {
            trees.insert(name.to_string(), db.open_tree(name)?);
        }
        trees[name].insert(key, value)?;
        Ok(())
    })?;
    check_blobs(&db)?;
    // Tenant incarnations come from the store's id generator: the new
    // store's must start past every restored one.
    let tenants = db.open_tree("tenants")?;
    let mut highest = 0;
    for value in tenants.iter().values() {
        let tenant: super::Tenant = decode(&value?)?;
        highest = highest.max(tenant.incarnation);
    }
    while db.generate_id()? <= highest {}
    db.flush()?;
    Ok(summary)
}

/// Every function version's blobs are in the store.
fn check_blobs(db: &sled::Db) -> Result<()> {
    let blobs = db.open_tree("blobs")?;
    for value in db.open_tree("functions")?.iter().values() {
        let function: FunctionRecord = decode(&value?)?;
        for version in &function.versions {
            for sha256 in version.blobs() {
                ensure!(
                    blobs.contains_key(sha256)?,
                    "{}/{} version {} needs blob {sha256}, which the backup lacks",
                    function.tenant,
                    function.name,
                    version.number
                );
            }
        }
    }
    Ok(())
}

/// Checks the archive `input` whole without restoring it.
pub fn check(input: impl Read) -> Result<Summary> {
    read(input, |_, _, _| Ok(()))
}
