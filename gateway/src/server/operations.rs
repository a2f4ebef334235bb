//! Operator tools: the tenants' usage per hour (`GET /v1/usage`, JSON or
//! CSV, for chargeback) and a backup of the embedded store while it
//! serves (`GET /v1/backup`).

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::routes::{check_name, json};
use super::{ApiError, Body, Gateway, Response};
use crate::auth::Principal;
use crate::usage::{HOUR, UsageRow, hour_of};

/// `GET /v1/usage`'s query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageQuery {
    /// One tenant's (the admin's choice; a tenant sees only its own).
    tenant: Option<String>,
    /// From this hour (RFC 3339 or Unix seconds) [default: 24 hours ago].
    since: Option<String>,
    /// Before this time [default: now, the current hour included].
    until: Option<String>,
    /// `json` (the default) or `csv`.
    format: Option<String>,
}

/// Largest span of hours one request may ask for (about a year).
const MAX_HOURS: u64 = 24 * 400;

impl Gateway {
    /// The tenants' usage per hour: the admin's of every tenant (or
    /// `tenant`), a tenant's of its own.
    pub(super) async fn usage_report(
        &self,
        headers: &HeaderMap,
        query: UsageQuery,
    ) -> Result<Response, ApiError> {
        let tenant = match (self.authenticate(headers).await?, query.tenant) {
            (Principal::Admin, tenant) => tenant,
            (Principal::Tenant(own), None) => Some(own),
            (Principal::Tenant(own), Some(asked)) if asked == own => Some(own),
            (Principal::Tenant(_), Some(asked)) => {
                return Err(ApiError::forbidden(format!(
                    "a tenant key sees its own tenant's usage only, not {asked:?}'s"
                )));
            }
        };
        if let Some(tenant) = &tenant {
            check_name("tenant", tenant)?;
        }
        let now = hour_of(SystemTime::now());
        let since = match &query.since {
            Some(text) => hour_of(instant("since", text)?),
            None => now.saturating_sub(23 * HOUR),
        };
        let until = match &query.until {
            Some(text) => unix(instant("until", text)?),
            None => now + HOUR,
        };
        if until <= since {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`until` must be later than `since`",
            )
            .param("until"));
        }
        if (until - since) / HOUR > MAX_HOURS {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("ask for at most {MAX_HOURS} hours at once"),
            )
            .param("since"));
        }
        let csv = match query.format.as_deref() {
            None | Some("json") => wants_csv(headers),
            Some("csv") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown format {other:?}: use json or csv"),
                )
                .param("format"));
            }
        };
        // This node's use so far counts too.
        self.flush_usage().await;
        let rows = self.store.usage(tenant.as_deref(), since, until).await?;
        if csv {
            return Ok(hyper::Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/csv; charset=utf-8")
                .body(super::full(usage_csv(&rows)))
                .expect("a valid response"));
        }
        let usage: Vec<_> = rows.iter().map(usage_json).collect();
        Ok(json(
            StatusCode::OK,
            json!({ "since": rfc3339(since), "until": rfc3339(until), "usage": usage }),
        ))
    }

    /// A backup of the store, streamed while it is written (admin).
    pub(super) async fn backup(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        self.require_admin(headers).await?;
        let (sender, mut chunks) = mpsc::channel(BACKUP_CHUNKS_QUEUED);
        let failures = sender.clone();
        let writer = Box::new(ChannelWriter {
            sender,
            runtime: tokio::runtime::Handle::current(),
            buffer: Vec::with_capacity(BACKUP_CHUNK),
        });
        let store = self.store.clone();
        let started = Instant::now();
        let written = tokio::spawn(async move {
            let outcome = store.backup(writer).await;
            match &outcome {
                Ok(summary) => tracing::info!(
                    secs = started.elapsed().as_secs_f64(),
                    "backup written: {summary}"
                ),
                Err(error) => {
                    tracing::warn!("backup failed: {error:#}");
                    let failed = std::io::Error::other(format!("the backup failed: {error:#}"));
                    let _ = failures.send(Err(failed)).await;
                }
            }
            outcome
        });
        // Refused before anything was written (a PostgreSQL store): an
        // error answer rather than an empty archive.
        let Some(first) = chunks.recv().await else {
            return match written.await {
                Ok(Err(error)) => Err(error.into()),
                Ok(Ok(_)) => Err(ApiError::internal(anyhow::anyhow!(
                    "the backup wrote nothing"
                ))),
                Err(panicked) => Err(ApiError::internal(panicked.into())),
            };
        };
        let first = first.map_err(|e| ApiError::internal(e.into()))?;
        let rest = futures_util::stream::unfold(chunks, |mut chunks| async move {
            chunks.recv().await.map(|chunk| (chunk, chunks))
        });
        let stream = futures_util::StreamExt::chain(
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
            rest,
        );
        let name = format!(
            "gigafactory-backup-{}.tar",
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        Ok(hyper::Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/x-tar")
            .header(
                "content-disposition",
                format!("attachment; filename=\"{}\"", name.replace(':', "-")),
            )
            .body(Body::from_stream(stream))
            .expect("a valid response"))
    }
}

/// Bytes the backup sends at a time.
const BACKUP_CHUNK: usize = 256 << 10;

/// Chunks queued for a slow client.
const BACKUP_CHUNKS_QUEUED: usize = 8;

/// How long a backup waits for a client that takes nothing: the store's
/// changes wait while it is written.
const BACKUP_STALL: Duration = Duration::from_secs(30);

/// The archive as it is written (on a blocking thread), sent to the
/// response in chunks.
struct ChannelWriter {
    sender: mpsc::Sender<Result<Bytes, std::io::Error>>,
    runtime: tokio::runtime::Handle,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(BACKUP_CHUNK),
        ));
        let sent = self.runtime.block_on(tokio::time::timeout(
            BACKUP_STALL,
            self.sender.send(Ok(chunk)),
        ));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the client went away",
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took nothing for {} s", BACKUP_STALL.as_secs()),
            )),
        }
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= BACKUP_CHUNK {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A time given as RFC 3339 (`2026-12-01T10:00:00Z`) or Unix seconds.
fn instant(param: &'static str, text: &str) -> Result<SystemTime, ApiError> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(UNIX_EPOCH + Duration::from_secs(secs));
    }
    humantime::parse_rfc3339_weak(text).map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("{param}={text:?} is not a time ({e}): give RFC 3339 (2026-12-01T10:00:00Z) or Unix seconds"),
        )
        .param(param)
    })
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.split(',').any(|t| t.trim().starts_with("text/csv")))
}

fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

fn usage_json(row: &UsageRow) -> serde_json::Value {
    let used = &row.consumed;
    json!({
        "tenant": row.tenant,
        "hour": rfc3339(row.hour),
        "requests": used.requests,
        "compute_seconds": seconds(used.compute_us),
        "model_seconds": seconds(used.model_us),
        "prompt_tokens": used.prompt_tokens,
        "generated_tokens": used.generated_tokens,
        "bytes_in": used.bytes_in,
        "bytes_out": used.bytes_out,
    })
}

/// The columns of the CSV export.
pub const CSV_HEADER: &str = "tenant,hour,requests,compute_seconds,model_seconds,prompt_tokens,generated_tokens,bytes_in,bytes_out";

fn usage_csv(rows: &[UsageRow]) -> String {
    let mut csv = format!("{CSV_HEADER}\n");
    for row in rows {
        let used = &row.consumed;
        // Tenant names are `a-z0-9-`: nothing to quote.
        let _ = writeln!(
            csv,
            "{},{},{},{:.6},{:.6},{},{},{},{}",
            row.tenant,
            rfc3339(row.hour),
            used.requests,
            seconds(used.compute_us),
            seconds(used.model_us),
            used.prompt_tokens,
            used.generated_tokens,
            used.bytes_in,
            used.bytes_out
        );
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Consumed;

    #[test]
    fn csv_has_a_header_and_a_line_per_row() {
        let rows = [UsageRow {
            tenant: "acme".into(),
            hour: 1_764_583_200,
            consumed: Consumed {
                requests: 3,
                compute_us: 1_500_000,
                ..Consumed::default()
            },
        }];
        let csv = usage_csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(
            lines[1],
            "acme,2025-12-01T10:00:00Z,3,1.500000,0.000000,0,0,0,0"
        );
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        assert_eq!(unix(instant("since", "1764583200").unwrap()), 1_764_583_200);
        assert_eq!(
            unix(instant("since", "2025-12-01T10:00:00Z").unwrap()),
            1_764_583_200
        );
        let refused = instant("since", "yesterday").unwrap_err();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }
}
