//! Deploy bundles: a tar holding `function.wasm`, an optional
//! `gigafactory.toml`, and the files the manifest maps into the guest.
//!
//! Unpacking never touches the disk and refuses anything that could
//! escape: absolute paths, `..`, links, devices, duplicates.

use std::collections::BTreeMap;
use std::io::Read;

use crate::manifest::Manifest;

/// The component's name inside a bundle.
pub const WASM_ENTRY: &str = "function.wasm";
/// The manifest's name inside a bundle.
pub const MANIFEST_ENTRY: &str = "gigafactory.toml";
const MAX_ENTRIES: usize = 1000;

/// An unpacked bundle.
#[derive(Debug, Default)]
pub struct Bundle {
    /// The component.
    pub wasm: Vec<u8>,
    /// The manifest (empty when the bundle has none).
    pub manifest: Manifest,
    /// Every other file, by its path in the bundle.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// A bundle of just a component.
    pub fn wasm(wasm: Vec<u8>) -> Self {
        Self {
            wasm,
            ..Self::default()
        }
    }

    /// Unpacks tar bytes.
    pub fn unpack(tar_bytes: &[u8]) -> Result<Self, String> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut wasm = None;
        let mut manifest = None;
        let mut files = BTreeMap::new();
        let entries = archive
            .entries()
            .map_err(|e| format!("not a tar archive: {e}"))?;
        for (count, entry) in entries.enumerate() {
            if count == MAX_ENTRIES {
                return Err(format!("the bundle has more than {MAX_ENTRIES} entries"));
            }
            let mut entry = entry.map_err(|e| format!("reading the bundle: {e}"))?;
            let kind = entry.header().entry_type();
            let raw = entry.path_bytes().into_owned();
            let path =
                String::from_utf8(raw).map_err(|_| "a bundle path is not UTF-8".to_string())?;
            if kind.is_dir() {
                check_path(path.trim_end_matches('/'))?;
                continue;
            }
            if !kind.is_file() {
                return Err(format!(
                    "{path:?} is not a regular file ({kind:?}): links and devices are refused"
                ));
            }
            check_path(&path)?;
            let mut content = Vec::new();
            entry
                .read_to_end(&mut content)
                .map_err(|e| format!("reading {path:?} from the bundle: {e}"))?;
            match path.as_str() {
                WASM_ENTRY => wasm = Some(content),
                MANIFEST_ENTRY => {
                    let text = String::from_utf8(content)
                        .map_err(|_| "gigafactory.toml is not UTF-8".to_string())?;
                    manifest = Some(Manifest::parse(&text)?);
                }
                _ => {
                    if files.insert(path.clone(), content).is_some() {
                        return Err(format!("{path:?} appears twice in the bundle"));
                    }
                }
            }
        }
        Ok(Self {
            wasm: wasm.ok_or_else(|| format!("the bundle has no {WASM_ENTRY}"))?,
            manifest: manifest.unwrap_or_default(),
            files,
        })
    }

    /// Packs a component, its manifest text and files into tar bytes.
    pub fn pack(
        wasm: &[u8],
        manifest: Option<&str>,
        files: &[(String, Vec<u8>)],
    ) -> std::io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, data)
        };
        add(WASM_ENTRY, wasm)?;
        if let Some(manifest) = manifest {
            add(MANIFEST_ENTRY, manifest.as_bytes())?;
        }
        for (path, data) in files {
            add(path, data)?;
        }
        builder.into_inner()
    }
}

/// A relative path of plain components: no root, `.`, `..` or empty parts.
fn check_path(path: &str) -> Result<(), String> {
    let valid = !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if valid {
        Ok(())
    } else {
        Err(format!("{path:?} would unpack outside the bundle"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_bundle() {
        let files = vec![("assets/a.txt".to_string(), b"alpha".to_vec())];
        let tar = Bundle::pack(b"\0asm", Some("memory_mib = 8"), &files).unwrap();
        let bundle = Bundle::unpack(&tar).unwrap();
        assert_eq!(bundle.wasm, b"\0asm");
        assert_eq!(bundle.manifest.memory_mib, Some(8));
        assert_eq!(bundle.files["assets/a.txt"], b"alpha");
    }

    #[test]
    fn refuses_paths_that_escape() {
        for path in ["../evil", "a/../../evil", "/etc/passwd", "./a", "a//b"] {
            assert!(check_path(path).is_err(), "{path} accepted");
        }
        assert!(check_path("a/b.txt").is_ok());
    }

    #[test]
    fn refuses_a_bundle_without_wasm_or_with_a_link() {
        let tar = Bundle::pack(b"x", None, &[]).unwrap();
        let mut no_wasm = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_entry_type(tar::EntryType::Regular);
        no_wasm
            .append_data(&mut header, "other", &b"x"[..])
            .unwrap();
        let error = Bundle::unpack(&no_wasm.into_inner().unwrap()).unwrap_err();
        assert!(error.contains("no function.wasm"), "{error}");

        let mut linked = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_entry_type(tar::EntryType::Symlink);
        linked.append_link(&mut header, "data", "/etc").unwrap();
        let error = Bundle::unpack(&linked.into_inner().unwrap()).unwrap_err();
        assert!(error.contains("links and devices are refused"), "{error}");
        assert!(Bundle::unpack(&tar).is_ok());
    }
}
