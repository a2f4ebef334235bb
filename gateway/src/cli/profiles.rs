//! Where the CLI finds its gateway and token: flags and environment
//! first, else a profile of the config file `gigafactory login` writes
//! (`$GIGAFACTORY_CONFIG`, else `$XDG_CONFIG_HOME/gigafactory/config.toml`,
//! else `~/.config/gigafactory/config.toml`; mode 0600: it holds tokens).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// The gateway a command talks to when nothing says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The profile used without `--profile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One gateway and a token for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The gateway's URL.
    pub url: String,
    /// An API key or the admin token.
    pub token: String,
    /// PEM certificates to trust for it besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// The config file's path.
pub fn config_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("GIGAFACTORY_CONFIG") {
        return Ok(PathBuf::from(path));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".config"),
            None => bail!("no HOME to keep the config in: set GIGAFACTORY_CONFIG"),
        },
    };
    Ok(base.join("gigafactory").join("config.toml"))
}

impl Config {
    /// The config at `path`; none there is an empty one.
    pub fn read(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the config to `path`, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self).context("writing the config")?;
        let partial = path.with_extension("toml.partial");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("writing {}", partial.display()))?;
        // An existing file keeps its mode: make sure it is the owner's only.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
    }

    /// The profile `name`, else the default one, if any.
    pub fn profile(&self, name: Option<&str>) -> Result<Option<&Profile>> {
        match name.or(self.default.as_deref()) {
            Some(name) => match self.profiles.get(name) {
                Some(profile) => Ok(Some(profile)),
                None => {
                    let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
                    bail!(
                        "no profile {name:?} in the config (it has: {}); `gigafactory login --profile {name}` adds it",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )
                }
            },
            None => Ok(None),
        }
    }
}

/// What a command connects with.
pub struct Target {
    /// The gateway's URL.
    pub url: String,
    /// The token, if any was given.
    pub token: Option<String>,
    /// Extra certificates to trust.
    pub ca: Option<PathBuf>,
}

/// Flags and environment over the profile (named, or the default one).
pub fn resolve(
    url: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    profile: Option<&str>,
) -> Result<Target> {
    let path = config_path()?;
    let config = if profile.is_some() || url.is_none() || token.is_none() {
        Config::read(&path)?
    } else {
        Config::default()
    };
    let chosen = config
        .profile(profile)
        .with_context(|| format!("in {}", path.display()))?;
    Ok(Target {
        url: url
            .or_else(|| chosen.map(|p| p.url.clone()))
            .unwrap_or_else(|| DEFAULT_URL.to_string()),
        token: token.or_else(|| chosen.map(|p| p.token.clone())),
        ca: ca.or_else(|| chosen.and_then(|p| p.ca.clone())),
    })
}
