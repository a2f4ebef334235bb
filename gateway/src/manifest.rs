//! `gigafactory.toml`: what a function asks the platform for. Every key is
//! optional and an unknown key is an error.
//!
//! ```toml
//! memory_mib = 64                  # linear memory limit
//! timeout_ms = 5000                # wall-clock limit per request
//! max_request_bytes = 1048576      # larger request bodies get 413
//! max_response_bytes = 10485760    # larger responses are cut off
//! max_concurrency = 8              # more concurrent requests get 429
//! models = ["all-minilm-l6-v2"]    # models `load-by-name` may open (default: all the tenant may use)
//! allowed_hosts = ["api.example.com", "127.0.0.1:9000"]  # outbound wasi:http (default: none)
//!
//! [env]                            # environment variables
//! GREETING = "hello"
//!
//! [files]                          # read-only files: guest path = path in the bundle
//! "/data/vocab.txt" = "assets/vocab.txt"
//!
//! [model_aliases]                  # other names load-by-name knows models by
//! default = "smollm2-135m-instruct"
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The parsed manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Linear memory limit in MiB. Example: `memory_mib = 64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Wall-clock limit of one request in milliseconds. Example: `timeout_ms = 5000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Largest request body in bytes; larger ones get 413. Example: `max_request_bytes = 1048576`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    /// Largest response body in bytes; the response is cut off past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    /// Requests of this function running at once; more get 429. Example: `max_concurrency = 8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Models `load-by-name` may open. Example: `models = ["all-minilm-l6-v2"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Hosts outbound `wasi:http` may reach: `host` or `host:port`. Example: `allowed_hosts = ["api.example.com"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Environment variables. Example: `[env] GREETING = "hello"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Read-only files: absolute guest path → path in the bundle. Example: `[files] "/vocab.txt" = "vocab.txt"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// Other names wasi-nn `load_by_name` knows repository models by, as
    /// WasmEdge's `--nn-preload` names them. Example: `[model_aliases] default = "smollm2-135m-instruct"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_aliases: BTreeMap<String, String>,
}

/// What the platform allows a manifest to ask for.
#[derive(Debug, Clone)]
pub struct Caps {
    /// Largest `memory_mib`.
    pub memory_mib: u64,
    /// Largest `timeout_ms`.
    pub timeout_ms: u64,
    /// Largest `max_request_bytes`.
    pub request_bytes: u64,
    /// Largest `max_response_bytes`.
    pub response_bytes: u64,
    /// Largest `max_concurrency`.
    pub concurrency: u32,
    /// Whether `allowed_hosts` may name this machine (loopback addresses,
    /// `localhost`): only when the operator says so.
    pub local_hosts: bool,
}

const MAX_ENV: usize = 64;
const MAX_ENV_VALUE: usize = 4096;
const MAX_FILES: usize = 1000;

impl Manifest {
    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| format!("invalid gigafactory.toml: {e}"))
    }

    /// Checks every value against `caps`, the known `models` and the
    /// bundle's `files`; the error says which key is wrong and why.
    pub fn validate(
        &self,
        caps: &Caps,
        models: &[String],
        bundle_files: &[&str],
    ) -> Result<(), String> {
        within("memory_mib", self.memory_mib, caps.memory_mib)?;
        within("timeout_ms", self.timeout_ms, caps.timeout_ms)?;
        within(
            "max_request_bytes",
            self.max_request_bytes,
            caps.request_bytes,
        )?;
        within(
            "max_response_bytes",
            self.max_response_bytes,
            caps.response_bytes,
        )?;
        within(
            "max_concurrency",
            self.max_concurrency.map(u64::from),
            u64::from(caps.concurrency),
        )?;
        for model in self.models.iter().flatten() {
            if !models.contains(model) {
                return Err(format!(
                    "models: no model {model:?} (available: {models:?})"
                ));
            }
        }
        if self.model_aliases.len() > MAX_ENV {
            return Err(format!("model_aliases: at most {MAX_ENV} aliases"));
        }
        for (alias, model) in &self.model_aliases {
            if alias.is_empty() || alias.len() > 256 {
                return Err(format!("model_aliases: invalid alias {alias:?}"));
            }
            if !models.contains(model) {
                return Err(format!(
                    "model_aliases: {alias} names no model {model:?} (available: {models:?})"
                ));
            }
        }
        for host in &self.allowed_hosts {
            check_host(host, caps.local_hosts)?;
        }
        if self.env.len() > MAX_ENV {
            return Err(format!("env: at most {MAX_ENV} variables"));
        }
        for (name, value) in &self.env {
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("env: invalid variable name {name:?}"));
            }
            if value.len() > MAX_ENV_VALUE {
                return Err(format!("env: {name} is over {MAX_ENV_VALUE} bytes"));
            }
        }
        if self.files.len() > MAX_FILES {
            return Err(format!("files: at most {MAX_FILES} files"));
        }
        for (guest, source) in &self.files {
            check_guest_path(guest)?;
            // "/a" a file and "/a/b" another cannot both exist.
            for (slash, _) in guest.match_indices('/').skip(1) {
                let parent = &guest[..slash];
                if self.files.contains_key(parent) {
                    return Err(format!(
                        "files: {parent:?} is a file, so {guest:?} cannot be inside it"
                    ));
                }
            }
            if !bundle_files.contains(&source.as_str()) {
                return Err(format!(
                    "files: {guest:?} maps to {source:?}, which is not in the bundle"
                ));
            }
        }
        Ok(())
    }
}

fn within(key: &str, value: Option<u64>, cap: u64) -> Result<(), String> {
    match value {
        Some(0) => Err(format!("{key} must be at least 1")),
        Some(v) if v > cap => Err(format!("{key} = {v} is over the limit of {cap}")),
        _ => Ok(()),
    }
}

fn check_host(rule: &str, local_allowed: bool) -> Result<(), String> {
    let (host, port) = match rule.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rule, None),
    };
    let lower = host.to_ascii_lowercase();
    let local = lower == "localhost"
        || lower.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    if local && !local_allowed {
        return Err(format!(
            "allowed_hosts: {rule:?} is this machine, which functions may not reach (the operator can allow it with `serve --allow-loopback-outbound`)"
        ));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!(
            "allowed_hosts: {rule:?} is not `host` or `host:port`"
        ))
    }
}

/// A guest path: absolute, normalised, not the root, no `.` or `..`.
fn check_guest_path(path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.strip_prefix('/').unwrap_or("").split('/').collect();
    let valid = path.starts_with('/')
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\0'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "files: {path:?} must be an absolute path like \"/data/file.txt\" without . or .."
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            memory_mib: 256,
            timeout_ms: 30_000,
            request_bytes: 1 << 20,
            response_bytes: 1 << 20,
            concurrency: 100,
            local_hosts: false,
        }
    }

    fn check(text: &str) -> Result<(), String> {
        Manifest::parse(text)?.validate(&caps(), &["m".to_string()], &["a.txt"])
    }

    #[test]
    fn accepts_a_full_manifest() {
        let text = r#"
            memory_mib = 64
            timeout_ms = 5000
            max_request_bytes = 1000
            max_response_bytes = 2000
            max_concurrency = 4
            models = ["m"]
            allowed_hosts = ["api.example.com", "10.0.0.1:9000"]
            [env]
            GREETING = "hi"
            [files]
            "/data/a.txt" = "a.txt"
            [model_aliases]
            default = "m"
        "#;
        check(text).unwrap();
    }

    #[test]
    fn names_the_wrong_key() {
        let cases = [
            (
                "memory_mib = 512",
                "memory_mib = 512 is over the limit of 256",
            ),
            ("timeout_ms = 0", "timeout_ms must be at least 1"),
            ("models = [\"x\"]", "no model \"x\""),
            (
                "[model_aliases]\ndefault = \"x\"",
                "model_aliases: default names no model \"x\"",
            ),
            (
                "allowed_hosts = [\"http://x\"]",
                "is not `host` or `host:port`",
            ),
            ("[env]\n\"1X\" = \"v\"", "invalid variable name"),
            (
                "allowed_hosts = [\"127.0.0.1:8080\"]",
                "is this machine, which functions may not reach",
            ),
            ("allowed_hosts = [\"localhost\"]", "is this machine"),
            ("[files]\n\"/a/../b\" = \"a.txt\"", "without . or .."),
            ("[files]\n\"rel\" = \"a.txt\"", "absolute path"),
            ("[files]\n\"/b\" = \"b.txt\"", "not in the bundle"),
            (
                "[files]\n\"/a\" = \"a.txt\"\n\"/a/b\" = \"a.txt\"",
                "\"/a\" is a file, so \"/a/b\" cannot be inside it",
            ),
            ("cpu = 2", "unknown field `cpu`"),
        ];
        for (text, expected) in cases {
            let error = check(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
