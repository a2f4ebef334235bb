//! Operator commands: `backup`, `restore` and `usage`.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt as _;
use hyper::Method;

use super::Client;
use super::client::{Reply, describe_error};
use super::commands::{print_or, table};
use crate::store::backup;

/// `gigafactory backup FILE`: the gateway's archive, written beside `file`,
/// checked whole, then moved into place.
pub(super) async fn backup(client: &Client, file: &Path) -> Result<()> {
    let response = client.open(Method::GET, "/v1/backup", None, &[]).await?;
    if !response.status().is_success() {
        let reply = Reply {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap_or_default(),
        };
        bail!("GET /v1/backup: {}", describe_error(&reply));
    }
    let partial = partial_path(file);
    let written = download(response, &partial).await;
    let checked = written.and_then(|bytes| {
        eprintln!("checking the archive");
        let archive = std::fs::File::open(&partial)
            .with_context(|| format!("reading {}", partial.display()))?;
        let summary = backup::check(std::io::BufReader::new(archive))
            .context("the archive received is not a whole backup")?;
        Ok((bytes, summary))
    });
    let (bytes, summary) = match checked {
        Ok(checked) => checked,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::rename(&partial, file)
        .with_context(|| format!("moving the backup to {}", file.display()))?;
    outln!(
        "backed up {summary} to {} ({})",
        file.display(),
        size(bytes)
    );
    Ok(())
}

/// `file` with `.partial` added to its name.
fn partial_path(file: &Path) -> std::path::PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    file.with_file_name(name)
}

/// Writes the response body to `path` (synced), showing progress; returns
/// its size.
async fn download(response: reqwest::Response, path: &Path) -> Result<u64> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Readable by its owner only: it holds every tenant's code and the
    // hashes of every key.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut body = response.bytes_stream();
    let (mut bytes, started, mut shown) = (0u64, Instant::now(), Instant::now());
    let terminal = std::io::stderr().is_terminal();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("receiving the backup (the gateway ended it early)")?;
        out.write_all(&chunk)
            .with_context(|| format!("writing {}", path.display()))?;
        bytes += chunk.len() as u64;
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            let line = format!(
                "received {} ({:.0} s)",
                size(bytes),
                started.elapsed().as_secs_f64()
            );
            if terminal {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
    }
    if terminal && started.elapsed() >= Duration::from_secs(1) {
        eprintln!();
    }
    out.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(bytes)
}

/// `gigafactory restore FILE --data DIR`.
pub(super) fn restore(file: &Path, data: &Path) -> Result<()> {
    let archive = std::fs::File::open(file)
        .with_context(|| format!("opening the backup {}", file.display()))?;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let store = data.join("store");
    eprintln!("restoring {} into {}", file.display(), store.display());
    let summary = backup::restore(&store, std::io::BufReader::new(archive))
        .with_context(|| format!("restoring {}", file.display()))?;
    outln!("restored {summary} into {}", data.display());
    outln!(
        "the admin token is the backed-up gateway's; start it with `gigafactory serve --data {}`",
        data.display()
    );
    Ok(())
}

/// Which usage to show.
pub(super) struct Range {
    pub tenant: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

/// `gigafactory usage`.
pub(super) async fn usage(client: &Client, range: Range, csv: bool, as_json: bool) -> Result<()> {
    let mut url = reqwest::Url::parse("http://gateway/v1/usage").expect("a valid URL");
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in [
            ("tenant", &range.tenant),
            ("since", &range.since),
            ("until", &range.until),
        ] {
            if let Some(value) = value {
                query.append_pair(name, value);
            }
        }
        if csv {
            query.append_pair("format", "csv");
        }
    }
    let path = match url.query() {
        Some(query) if !query.is_empty() => format!("{}?{query}", url.path()),
        _ => url.path().to_string(),
    };
    if csv {
        let reply = client.send(Method::GET, &path, None, &[]).await?;
        if !reply.status.is_success() {
            bail!("GET {path}: {}", describe_error(&reply));
        }
        super::write_bytes(&reply.body);
        return Ok(());
    }
    let reply = client.api(Method::GET, &path, None).await?;
    print_or(as_json, &reply, || {
        let header = format!(
            "{:<20} {:<20} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}",
            "TENANT", "HOUR", "REQUESTS", "COMPUTE_S", "MODEL_S", "PROMPT", "TOKENS", "IN", "OUT"
        );
        table(&header, &reply["usage"], |row| {
            format!(
                "{:<20} {:<20} {:>9} {:>10.3} {:>10.3} {:>8} {:>8} {:>10} {:>10}",
                row["tenant"].as_str().unwrap_or("?"),
                row["hour"].as_str().unwrap_or("?"),
                row["requests"],
                row["compute_seconds"].as_f64().unwrap_or(0.0),
                row["model_seconds"].as_f64().unwrap_or(0.0),
                row["prompt_tokens"],
                row["generated_tokens"],
                size(row["bytes_in"].as_u64().unwrap_or(0)),
                size(row["bytes_out"].as_u64().unwrap_or(0)),
            )
        })
    });
    Ok(())
}

/// Bytes for people: 512 B, 1.5 KiB, 3.2 MiB …
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
