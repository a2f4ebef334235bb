//! Each function's recent log lines, kept in memory for
//! `GET /v1/functions/{name}/logs` and `gigafactory logs`. Everything is
//! bounded: a line's bytes, a function's lines and bytes, and how many
//! functions' logs are kept (the least recently written go first).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gigafactory_runtime::logs::{LogSink, LogStream, TRUNCATED};
use serde::Serialize;
use tokio::sync::broadcast;

/// Lines kept per function; older ones are dropped.
pub const LINES_PER_FUNCTION: usize = 1000;

/// Bytes of lines kept per function; older lines are dropped.
pub const BYTES_PER_FUNCTION: usize = 256 * 1024;

/// Longest line kept; longer ones are cut and marked.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Functions whose logs are kept; past it the least recently written go.
pub const MAX_FUNCTION_LOGS: usize = 1024;

/// Functions of one tenant whose logs are kept.
pub const MAX_TENANT_LOGS: usize = 256;

/// One log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// `stdout`, `stderr` or `platform` (what the gateway says about the function).
    pub stream: &'static str,
    /// The line, without its newline.
    pub line: String,
}

/// The logs of every function, by `tenant/function`.
#[derive(Default)]
pub struct FunctionLogs {
    logs: Mutex<HashMap<String, Arc<FunctionLog>>>,
}

impl FunctionLogs {
    /// The log of one function, created on first use. Creating one drops
    /// the least recently written log of the same tenant once it has
    /// [`MAX_TENANT_LOGS`], else the least recently written of all past
    /// [`MAX_FUNCTION_LOGS`]: a tenant with many functions cycles its own
    /// logs, not the others'.
    pub fn of(&self, tenant: &str, function: &str) -> Arc<FunctionLog> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let name = format!("{tenant}/{function}");
        if let Some(log) = logs.get(&name) {
            return log.clone();
        }
        let prefix = format!("{tenant}/");
        let own = logs.keys().filter(|n| n.starts_with(&prefix)).count();
        let oldest = |logs: &HashMap<String, Arc<FunctionLog>>, own_only: bool| {
            logs.iter()
                .filter(|(n, _)| !own_only || n.starts_with(&prefix))
                .min_by_key(|(_, log)| log.written())
                .map(|(n, _)| n.clone())
        };
        let evict = if own >= MAX_TENANT_LOGS {
            oldest(&logs, true)
        } else if logs.len() >= MAX_FUNCTION_LOGS {
            oldest(&logs, false)
        } else {
            None
        };
        if let Some(evicted) = evict {
            logs.remove(&evicted);
        }
        logs.entry(name).or_default().clone()
    }

    /// Forgets a deleted function's lines.
    pub fn remove(&self, tenant: &str, function: &str) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.remove(&format!("{tenant}/{function}"));
    }
}

/// One function's recent lines, and a feed of new ones for followers.
pub struct FunctionLog {
    lines: Mutex<Lines>,
    feed: broadcast::Sender<LogLine>,
}

struct Lines {
    lines: VecDeque<LogLine>,
    bytes: usize,
    /// When it was last written to, on [`WRITES`]' clock.
    written: u64,
}

/// A clock of log writes, ordering logs by when they were last written.
static WRITES: AtomicU64 = AtomicU64::new(0);

impl Default for FunctionLog {
    fn default() -> Self {
        let lines = Lines {
            lines: VecDeque::new(),
            bytes: 0,
            written: WRITES.fetch_add(1, Ordering::Relaxed),
        };
        Self {
            lines: Mutex::new(lines),
            feed: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }
}

/// Lines a slow follower may fall behind before it skips some.
const FOLLOW_BUFFER: usize = 256;

impl FunctionLog {
    /// Appends a line (cut at [`MAX_LINE_BYTES`]), dropping the oldest
    /// past the bounds.
    pub fn push(&self, stream: &'static str, line: &str) {
        let line = LogLine {
            time_ms: now_ms(),
            stream,
            line: bounded_line(line),
        };
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.bytes += line.line.len();
        lines.written = WRITES.fetch_add(1, Ordering::Relaxed);
        lines.lines.push_back(line.clone());
        while lines.lines.len() > LINES_PER_FUNCTION || lines.bytes > BYTES_PER_FUNCTION {
            let Some(dropped) = lines.lines.pop_front() else {
                break;
            };
            lines.bytes -= dropped.line.len();
        }
        drop(lines);
        // Nobody following is fine.
        let _ = self.feed.send(line);
    }

    /// The recent lines and a receiver of every line after them.
    pub fn follow(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        (lines.lines.iter().cloned().collect(), self.feed.subscribe())
    }

    /// The last `limit` lines, oldest first.
    pub fn tail(&self, limit: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let lines = &lines.lines;
        lines
            .iter()
            .skip(lines.len().saturating_sub(limit))
            .cloned()
            .collect()
    }

    fn written(&self) -> u64 {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).written
    }
}

/// `line`, cut at [`MAX_LINE_BYTES`] (on a character boundary) and marked.
fn bounded_line(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_string();
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} {TRUNCATED}", &line[..end])
}

impl LogSink for FunctionLog {
    fn line(&self, stream: LogStream, line: &str) {
        let stream = match stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        };
        self.push(stream, line);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_lines() {
        let log = FunctionLog::default();
        for i in 0..LINES_PER_FUNCTION + 5 {
            log.push("stdout", &i.to_string());
        }
        let tail = log.tail(usize::MAX);
        assert_eq!(tail.len(), LINES_PER_FUNCTION);
        assert_eq!(tail[0].line, "5");
        assert_eq!(
            log.tail(2)
                .iter()
                .map(|l| l.line.as_str())
                .collect::<Vec<_>>(),
            ["1003", "1004"]
        );
    }

    #[test]
    fn lines_and_logs_are_bounded_in_bytes() {
        let log = FunctionLog::default();
        log.push("platform", &"x".repeat(100 << 20));
        let kept = &log.tail(1)[0].line;
        assert!(kept.len() < MAX_LINE_BYTES + 32 && kept.ends_with(TRUNCATED));
        for _ in 0..100 {
            log.push("stdout", &"y".repeat(MAX_LINE_BYTES));
        }
        let bytes: usize = log.tail(usize::MAX).iter().map(|l| l.line.len()).sum();
        assert!(bytes <= BYTES_PER_FUNCTION, "{bytes} bytes kept");
    }

    #[test]
    fn the_least_recently_written_log_goes_first() {
        let logs = FunctionLogs::default();
        for i in 0..MAX_FUNCTION_LOGS {
            let tenant = format!("t{}", i % 8);
            logs.of(&tenant, &format!("f{i}")).push("stdout", "hi");
        }
        logs.of("t0", "f0").push("stdout", "again");
        logs.of("u", "new");
        let kept = logs.logs.lock().unwrap();
        assert_eq!(kept.len(), MAX_FUNCTION_LOGS);
        assert!(kept.contains_key("t0/f0") && kept.contains_key("u/new"));
        assert!(!kept.contains_key("t1/f1"), "the oldest of all went");
    }

    #[test]
    fn a_tenant_with_many_functions_cycles_its_own_logs() {
        let logs = FunctionLogs::default();
        logs.of("quiet", "f").push("stdout", "hi");
        for i in 0..MAX_FUNCTION_LOGS * 2 {
            logs.of("busy", &format!("f{i}")).push("stdout", "hi");
        }
        let kept = logs.logs.lock().unwrap();
        assert!(kept.contains_key("quiet/f"));
        let busy = kept.keys().filter(|n| n.starts_with("busy/")).count();
        assert_eq!(busy, MAX_TENANT_LOGS);
    }
}
