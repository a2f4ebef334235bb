//! `gigafactory models add|update|show|remove|rescan`: models managed
//! through the API, their files uploaded in resumable parts.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::ModelsCommand;
use super::client::{Client, describe_error};
use super::commands::print_or;

/// Times one part is sent before the upload gives up (it resumes when
/// the command runs again).
const PART_ATTEMPTS: u32 = 5;

/// Runs a `models` command.
pub(super) async fn run(client: &Client, command: ModelsCommand, as_json: bool) -> Result<()> {
    match command {
        ModelsCommand::Show { name, config } => {
            let reply = client
                .api(Method::GET, &format!("/v1/models/{name}"), None)
                .await?;
            if config {
                match reply["config"].as_str() {
                    Some(config) => out!("{config}"),
                    None => bail!(
                        "{name} is a model of the repository directory: its model.toml is there"
                    ),
                }
                return Ok(());
            }
            print_or(as_json, &reply, || describe(&reply));
            Ok(())
        }
        ModelsCommand::Add {
            name,
            path,
            config,
            format,
            task,
            model_file,
            public,
            on_node,
        } => {
            let mut body = json!({
                "name": name, "format": format, "task": task, "model_file": model_file,
                "public": public,
            });
            let config = if on_node {
                body["path"] = json!(path);
                eprintln!("the node stores {} itself …", path.display());
                read_config(config.as_deref(), None)?
            } else {
                let (files, found_config) = upload_all(client, &path).await?;
                body["files"] = json!(files);
                read_config(config.as_deref(), found_config)?
            };
            body["config"] = json!(config);
            eprintln!("adding model {name}");
            let reply = client
                .api(Method::POST, "/v1/models", Some(json_body(&body)))
                .await
                .with_context(|| format!("adding model {name}"))?;
            print_or(as_json, &reply, || {
                let generated = if config.is_none() {
                    format!(
                        "\nits model.toml was generated from the file: see it with \
                         `gigafactory models show {name} --config`, edit it, and store it with \
                         `gigafactory models update {name} --config model.toml`"
                    )
                } else {
                    String::new()
                };
                format!("{}{generated}", describe(&reply))
            });
            Ok(())
        }
        ModelsCommand::AddAdapter {
            base,
            name,
            file,
            scale,
            public,
        } => {
            let (files, _) = upload_all(client, &file).await?;
            let body = json!({
                "name": name, "files": files, "base": base, "scale": scale, "public": public,
            });
            eprintln!("adding LoRA adapter {name} of {base}");
            let reply = client
                .api(Method::POST, "/v1/models", Some(json_body(&body)))
                .await
                .with_context(|| format!("adding LoRA adapter {name}"))?;
            print_or(as_json, &reply, || describe(&reply));
            Ok(())
        }
        ModelsCommand::Update { name, path, config } => {
            let mut body = serde_json::Map::new();
            let mut found_config = None;
            if let Some(path) = &path {
                let (files, found) = upload_all(client, path).await?;
                body.insert("files".into(), serde_json::to_value(files)?);
                found_config = found;
            }
            if let Some(config) = read_config(config.as_deref(), found_config)? {
                body.insert("config".into(), Value::String(config));
            }
            if body.is_empty() {
                bail!("nothing to update: give a new file or directory, or --config");
            }
            eprintln!("updating model {name}");
            let reply = client
                .api(
                    Method::PUT,
                    &format!("/v1/models/{name}"),
                    Some(json_body(&Value::Object(body))),
                )
                .await
                .with_context(|| format!("updating model {name}"))?;
            print_or(as_json, &reply, || describe(&reply));
            Ok(())
        }
        ModelsCommand::Remove { name, force } => {
            let query = if force { "?force=true" } else { "" };
            client
                .api(Method::DELETE, &format!("/v1/models/{name}{query}"), None)
                .await?;
            outln!("removed model {name}");
            Ok(())
        }
        ModelsCommand::Rescan => {
            let reply = client
                .api(Method::POST, "/v1/repository/rescan", None)
                .await?;
            print_or(as_json, &reply, || {
                let names = |key: &str| {
                    let names: Vec<&str> = reply[key]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                };
                format!(
                    "added: {}\nreplaced: {}\nremoved: {}",
                    names("added"),
                    names("replaced"),
                    names("removed")
                )
            });
            Ok(())
        }
        ModelsCommand::List | ModelsCommand::Devices => unreachable!("handled by the caller"),
    }
}

fn json_body(value: &Value) -> (&'static str, Bytes) {
    ("application/json", Bytes::from(value.to_string()))
}

/// The model.toml to send: the one named, else the directory's.
fn read_config(named: Option<&Path>, found: Option<PathBuf>) -> Result<Option<String>> {
    match named.map(Path::to_path_buf).or(found) {
        Some(path) => Ok(Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        None => Ok(None),
    }
}

/// A summary of a model as the API shows it.
fn describe(reply: &Value) -> String {
    let model = if reply["model"].is_object() {
        &reply["model"]
    } else {
        reply
    };
    let mut out = format!(
        "{} {} ({}, {}), {}",
        model["name"]
            .as_str()
            .or(reply["name"].as_str())
            .unwrap_or("?"),
        reply["version"]
            .as_u64()
            .map_or_else(String::new, |v| format!("version {v}")),
        model["format"].as_str().unwrap_or("?"),
        model["engine"].as_str().unwrap_or("?"),
        model["state"]
            .as_str()
            .unwrap_or("not installed on this node yet"),
    );
    if let Some(error) = model["error"].as_str() {
        out.push_str(&format!("\n    error: {error}"));
    }
    if let Some(files) = reply["files"].as_object() {
        for (path, file) in files {
            out.push_str(&format!(
                "\n    {path}  {} bytes  sha256 {}",
                file["size"].as_u64().unwrap_or(0),
                file["sha256"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}

/// Uploads the model file at `path`, or every file of the directory at
/// `path` (its model.toml aside, which is returned); each file's
/// reference by its path in the model's directory.
async fn upload_all(
    client: &Client,
    path: &Path,
) -> Result<(BTreeMap<String, Value>, Option<PathBuf>)> {
    let mut files = BTreeMap::new();
    let mut config = None;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let local: Vec<(String, PathBuf)> = if meta.is_dir() {
        let mut found = Vec::new();
        walk(path, path, &mut found)?;
        found
    } else {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("the file name is not UTF-8")?
            .to_string();
        vec![(name, path.to_path_buf())]
    };
    for (relative, file) in local {
        if relative == "model.toml" {
            config = Some(file);
            continue;
        }
        let (sha256, size) = upload(client, &relative, &file).await?;
        files.insert(relative, json!({"sha256": sha256, "size": size}));
    }
    if files.is_empty() {
        bail!("{} has no model files", path.display());
    }
    Ok((files, config))
}

/// The regular files below `dir`, by their path relative to `root`.
fn walk(root: &Path, dir: &Path, found: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, found)?;
        } else if path.is_file() {
            let relative = path
                .strip_prefix(root)?
                .to_str()
                .context("a file name is not UTF-8")?
                .to_string();
            found.push((relative, path));
        }
    }
    Ok(())
}

/// Uploads one file: hashed, then its missing parts sent (each with its
/// own sha256, retried); its sha256 and size.
async fn upload(client: &Client, name: &str, path: &Path) -> Result<(String, u64)> {
    let (sha256, size) = {
        let (name, path) = (name.to_string(), path.to_path_buf());
        tokio::task::spawn_blocking(move || hash_file(&name, &path)).await??
    };
    let begun = client
        .api(
            Method::PUT,
            &format!("/v1/model-files/{sha256}"),
            Some(json_body(&json!({ "size": size }))),
        )
        .await
        .with_context(|| format!("starting the upload of {name}"))?;
    let part_size = begun["part_size"].as_u64().context("no part_size")?;
    let parts = begun["parts"].as_u64().context("no parts")? as u32;
    let received: Vec<u32> = begun["received"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<u32> = (0..parts).filter(|i| !received.contains(i)).collect();
    if missing.is_empty() {
        eprintln!("{name}: already uploaded ({})", human(size));
        return Ok((sha256, size));
    }
    if !received.is_empty() {
        eprintln!(
            "{name}: resuming the upload, {} of {parts} parts already stored",
            received.len()
        );
    }
    let started = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut sent = 0u64;
    for (done, index) in missing.iter().enumerate() {
        let offset = u64::from(*index) * part_size;
        let len = size.saturating_sub(offset).min(part_size) as usize;
        let mut part = vec![0u8; len];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut part)?;
        let part = Bytes::from(part);
        let part_sha = hex::encode(Sha256::digest(&part));
        send_part(client, &sha256, *index, part, &part_sha)
            .await
            .with_context(|| {
                format!(
                    "uploading part {index} of {name}; run the command again to resume from there"
                )
            })?;
        sent += len as u64;
        let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "{name}: part {} of {} sent ({} at {}/s)",
            done + 1,
            missing.len(),
            human(sent),
            human(rate as u64)
        );
    }
    Ok((sha256, size))
}

/// Sends one part, again after a failure that may pass (the connection,
/// a timeout, a 5xx).
async fn send_part(
    client: &Client,
    sha256: &str,
    index: u32,
    part: Bytes,
    part_sha: &str,
) -> Result<()> {
    let path = format!("/v1/model-files/{sha256}/parts/{index}");
    let headers = [("x-part-sha256".to_string(), part_sha.to_string())];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = client
            .send(
                Method::PUT,
                &path,
                Some(("application/octet-stream", part.clone())),
                &headers,
            )
            .await;
        let retry = match &outcome {
            Ok(reply) if reply.status.is_success() => return Ok(()),
            Ok(reply) => {
                reply.status.is_server_error()
                    || reply.status == StatusCode::REQUEST_TIMEOUT
                    || reply.status == StatusCode::TOO_MANY_REQUESTS
            }
            Err(_) => true,
        };
        if !retry || attempt >= PART_ATTEMPTS {
            return match outcome {
                Ok(reply) => bail!("PUT {path}: {}", describe_error(&reply)),
                Err(error) => Err(error),
            };
        }
        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
    }
}

/// The file's sha256 and size, with progress for large files.
fn hash_file(name: &str, path: &Path) -> Result<(String, u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 8 << 20];
    let (mut read, mut shown) = (0u64, Instant::now());
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        read += n as u64;
        if shown.elapsed() > Duration::from_secs(2) {
            eprintln!("{name}: hashing, {} of {}", human(read), human(size));
            shown = Instant::now();
        }
    }
    Ok((hex::encode(hasher.finalize()), size))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{} KiB", b.div_ceil(1024)),
    }
}
