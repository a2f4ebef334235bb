//! Each function's recent log lines, kept in memory (bounded) for
//! `GET /v1/functions/{name}/logs` and `gigafactory logs`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use gigafactory_runtime::logs::{LogSink, LogStream};
use serde::Serialize;
use tokio::sync::broadcast;

/// Lines kept per function; older ones are dropped.
pub const LINES_PER_FUNCTION: usize = 1000;

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
    /// The log of one function (created on first use).
    pub fn of(&self, tenant: &str, function: &str) -> Arc<FunctionLog> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.entry(format!("{tenant}/{function}"))
            .or_default()
            .clone()
    }

    /// Forgets a deleted function's lines.
    pub fn remove(&self, tenant: &str, function: &str) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.remove(&format!("{tenant}/{function}"));
    }
}

/// One function's recent lines, and a feed of new ones for followers.
pub struct FunctionLog {
    lines: Mutex<VecDeque<LogLine>>,
    feed: broadcast::Sender<LogLine>,
}

impl Default for FunctionLog {
    fn default() -> Self {
        Self {
            lines: Mutex::default(),
            feed: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }
}

/// Lines a slow follower may fall behind before it skips some.
const FOLLOW_BUFFER: usize = 256;

impl FunctionLog {
    /// Appends a line, dropping the oldest past the bound.
    pub fn push(&self, stream: &'static str, line: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == LINES_PER_FUNCTION {
            lines.pop_front();
        }
        let line = LogLine {
            time_ms: now_ms(),
            stream,
            line: line.to_string(),
        };
        lines.push_back(line.clone());
        // Nobody following is fine.
        let _ = self.feed.send(line);
    }

    /// The recent lines and a receiver of every line after them.
    pub fn follow(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        (lines.iter().cloned().collect(), self.feed.subscribe())
    }

    /// The last `limit` lines, oldest first.
    pub fn tail(&self, limit: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(limit))
            .cloned()
            .collect()
    }
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
}
