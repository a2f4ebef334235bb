//! The embedded store's records: one serde type per record kind and
//! version, written as JSON with a `"v"` field. A record without one was
//! written before records were versioned and reads as version 1 (the same
//! layout). A record newer than this build is refused with a message
//! saying so, never misread.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ApiKey, FileRef, FunctionRecord, ModelBlob, ModelRecord, Tenant, Version};
use crate::manifest::Manifest;
use crate::quota::{Quota, Usage};
use crate::usage::Consumed;

/// The record layout this build writes.
const CURRENT: u64 = 1;

#[derive(Serialize, Deserialize)]
pub(super) struct TenantV1 {
    name: String,
    created_at: u64,
    #[serde(default)]
    quota: Quota,
    #[serde(default)]
    usage: Usage,
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    incarnation: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleting: bool,
}

#[derive(Serialize, Deserialize)]
pub(super) struct ApiKeyV1 {
    id: String,
    tenant: String,
    created_at: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct FunctionV1 {
    tenant: String,
    name: String,
    active: u32,
    versions: Vec<VersionV1>,
    created_at: u64,
}

#[derive(Serialize, Deserialize)]
struct VersionV1 {
    number: u32,
    sha256: String,
    size: u64,
    deployed_at: u64,
    #[serde(default)]
    manifest: Manifest,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    files: BTreeMap<String, FileV1>,
}

#[derive(Serialize, Deserialize)]
struct FileV1 {
    sha256: String,
    size: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct ModelV1 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    name: String,
    version: u32,
    config: String,
    files: BTreeMap<String, FileV1>,
    created_at: u64,
    updated_at: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct ModelBlobV1 {
    sha256: String,
    size: u64,
    part_size: u64,
    received: Vec<u32>,
    verified: bool,
    refs: u64,
    updated_at: u64,
}

/// A model file as the embedded store keeps it: what is stored of it, how
/// many models use it, and when an upload last touched it.
#[derive(Debug, Clone)]
pub(super) struct StoredModelBlob {
    pub(super) blob: ModelBlob,
    pub(super) refs: u64,
    pub(super) updated_at: u64,
}

fn files_to_current(files: &BTreeMap<String, FileRef>) -> BTreeMap<String, FileV1> {
    files
        .iter()
        .map(|(path, f)| {
            let file = FileV1 {
                sha256: f.sha256.clone(),
                size: f.size,
            };
            (path.clone(), file)
        })
        .collect()
}

fn files_from_current(files: BTreeMap<String, FileV1>) -> BTreeMap<String, FileRef> {
    files
        .into_iter()
        .map(|(path, f)| {
            let file = FileRef {
                sha256: f.sha256,
                size: f.size,
            };
            (path, file)
        })
        .collect()
}

/// A record kind: its current layout and the conversions to and from it.
pub(super) trait Record: Sized {
    /// The layout written now.
    type Current: Serialize + DeserializeOwned;
    /// What the record is, for error messages.
    const KIND: &'static str;
    fn to_current(&self) -> Self::Current;
    fn from_current(record: Self::Current) -> Self;
}

impl Record for Tenant {
    type Current = TenantV1;
    const KIND: &'static str = "tenant";
    fn to_current(&self) -> TenantV1 {
        TenantV1 {
            name: self.name.clone(),
            created_at: self.created_at,
            quota: self.quota.clone(),
            usage: self.usage,
            revision: self.revision,
            incarnation: self.incarnation,
            deleting: self.deleting,
        }
    }
    fn from_current(r: TenantV1) -> Self {
        Self {
            name: r.name,
            created_at: r.created_at,
            quota: r.quota,
            usage: r.usage,
            revision: r.revision,
            incarnation: r.incarnation,
            deleting: r.deleting,
        }
    }
}

impl Record for ApiKey {
    type Current = ApiKeyV1;
    const KIND: &'static str = "API key";
    fn to_current(&self) -> ApiKeyV1 {
        ApiKeyV1 {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            created_at: self.created_at,
        }
    }
    fn from_current(r: ApiKeyV1) -> Self {
        Self {
            id: r.id,
            tenant: r.tenant,
            created_at: r.created_at,
        }
    }
}

impl Record for FunctionRecord {
    type Current = FunctionV1;
    const KIND: &'static str = "function";
    fn to_current(&self) -> FunctionV1 {
        let version = |v: &Version| VersionV1 {
            number: v.number,
            sha256: v.sha256.clone(),
            size: v.size,
            deployed_at: v.deployed_at,
            manifest: v.manifest.clone(),
            files: files_to_current(&v.files),
        };
        FunctionV1 {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            active: self.active,
            versions: self.versions.iter().map(version).collect(),
            created_at: self.created_at,
        }
    }
    fn from_current(r: FunctionV1) -> Self {
        let version = |v: VersionV1| Version {
            number: v.number,
            sha256: v.sha256,
            size: v.size,
            deployed_at: v.deployed_at,
            manifest: v.manifest,
            files: files_from_current(v.files),
        };
        Self {
            tenant: r.tenant,
            name: r.name,
            active: r.active,
            versions: r.versions.into_iter().map(version).collect(),
            created_at: r.created_at,
        }
    }
}

impl Record for ModelRecord {
    type Current = ModelV1;
    const KIND: &'static str = "model";
    fn to_current(&self) -> ModelV1 {
        ModelV1 {
            owner: self.owner.clone(),
            name: self.name.clone(),
            version: self.version,
            config: self.config.clone(),
            files: files_to_current(&self.files),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
    fn from_current(r: ModelV1) -> Self {
        Self {
            owner: r.owner,
            name: r.name,
            version: r.version,
            config: r.config,
            files: files_from_current(r.files),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

impl Record for StoredModelBlob {
    type Current = ModelBlobV1;
    const KIND: &'static str = "model file";
    fn to_current(&self) -> ModelBlobV1 {
        ModelBlobV1 {
            sha256: self.blob.sha256.clone(),
            size: self.blob.size,
            part_size: self.blob.part_size,
            received: self.blob.received.clone(),
            verified: self.blob.verified,
            refs: self.refs,
            updated_at: self.updated_at,
        }
    }
    fn from_current(r: ModelBlobV1) -> Self {
        Self {
            blob: ModelBlob {
                sha256: r.sha256,
                size: r.size,
                part_size: r.part_size,
                received: r.received,
                verified: r.verified,
            },
            refs: r.refs,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct UsageV1 {
    #[serde(flatten)]
    consumed: Consumed,
}

impl Record for Consumed {
    type Current = UsageV1;
    const KIND: &'static str = "usage";
    fn to_current(&self) -> UsageV1 {
        UsageV1 { consumed: *self }
    }
    fn from_current(r: UsageV1) -> Self {
        r.consumed
    }
}

/// The record as stored: its current layout with `"v"`.
pub(super) fn encode<R: Record>(record: &R) -> Result<Vec<u8>> {
    let mut value = serde_json::to_value(record.to_current())
        .with_context(|| format!("encoding a {} record", R::KIND))?;
    value
        .as_object_mut()
        .context("a record encodes as an object")?
        .insert("v".into(), CURRENT.into());
    serde_json::to_vec(&value).with_context(|| format!("encoding a {} record", R::KIND))
}

/// A stored record, of any layout this build reads.
pub(super) fn decode<R: Record>(bytes: &[u8]) -> Result<R> {
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).with_context(|| format!("decoding a {} record", R::KIND))?;
    let version = value
        .as_object_mut()
        .with_context(|| format!("a {} record is not a JSON object", R::KIND))?
        .remove("v")
        .map_or(Some(1), |v| v.as_u64());
    match version {
        Some(1) => serde_json::from_value(value)
            .map(R::from_current)
            .with_context(|| format!("decoding a version-1 {} record", R::KIND)),
        Some(v) => bail!(
            "a {} record has layout version {v}, newer than this build reads (1 to {CURRENT}): \
             upgrade this node",
            R::KIND
        ),
        None => bail!("a {} record's layout version is not a number", R::KIND),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_before_versioning_read_as_version_one() {
        let legacy = br#"{"id":"gf_abc","tenant":"acme","created_at":5}"#;
        let key: ApiKey = decode(legacy).unwrap();
        assert_eq!(key.tenant, "acme");
        let again: ApiKey = decode(&encode(&key).unwrap()).unwrap();
        assert_eq!(again, key);
        assert!(
            String::from_utf8(encode(&key).unwrap())
                .unwrap()
                .contains(r#""v":1"#)
        );
    }

    #[test]
    fn a_record_from_a_newer_build_is_refused_not_misread() {
        let newer = br#"{"v":2,"id":"gf_abc","tenant":"acme","created_at":5,"scopes":["x"]}"#;
        let refused = decode::<ApiKey>(newer).unwrap_err();
        assert!(
            format!("{refused:#}").contains("layout version 2"),
            "{refused:#}"
        );
    }
}
