//! A function's stdout and stderr: split into lines and handed to a
//! [`LogSink`], never to the gateway's own terminal.
//!
//! Output is bounded per request: past [`LogLimits::max_bytes`] the rest is
//! dropped and one truncation marker is logged; an over-long line is cut
//! with the same marker. Writes always succeed, so a chatty guest is never
//! trapped for logging, it is only silenced.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

/// Where a function's log lines go (the gateway keeps them per function).
pub trait LogSink: Send + Sync {
    /// Receives one complete line, without its newline.
    fn line(&self, stream: LogStream, line: &str);
}

/// How much a single request may log.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Bytes per request over both streams; the rest is dropped.
    pub max_bytes: usize,
    /// Bytes per line; longer lines are cut.
    pub max_line_bytes: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
            max_line_bytes: 4 * 1024,
        }
    }
}

/// The marker appended where output was cut.
pub const TRUNCATED: &str = "[truncated]";

/// `text` cut at `max` bytes (on a character boundary) and marked: for
/// strings a guest controls that the host keeps or passes on.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(' ');
    text.push_str(TRUNCATED);
    text
}

/// Shared by one request's stdout and stderr.
pub(crate) struct RequestLog {
    sink: Arc<dyn LogSink>,
    limits: LogLimits,
    state: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    written: usize,
    silenced: bool,
    partial: [Vec<u8>; 2],
    cut: [bool; 2],
}

impl RequestLog {
    pub(crate) fn new(sink: Arc<dyn LogSink>, limits: LogLimits) -> Arc<Self> {
        Arc::new(Self {
            sink,
            limits,
            state: Mutex::default(),
        })
    }

    /// A WASI output stream writing into this log.
    pub(crate) fn stream(self: &Arc<Self>, stream: LogStream) -> GuestOutput {
        GuestOutput {
            log: self.clone(),
            stream,
        }
    }

    fn write(&self, stream: LogStream, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.silenced {
            return;
        }
        let room = self.limits.max_bytes.saturating_sub(state.written);
        let accepted = &bytes[..bytes.len().min(room)];
        state.written += accepted.len();
        let index = stream as usize;
        for chunk in accepted.split_inclusive(|&b| b == b'\n') {
            let (content, ends_line) = match chunk.strip_suffix(b"\n") {
                Some(content) => (content, true),
                None => (chunk, false),
            };
            let partial = &mut state.partial[index];
            let room = self.limits.max_line_bytes.saturating_sub(partial.len());
            partial.extend_from_slice(&content[..content.len().min(room)]);
            state.cut[index] |= content.len() > room;
            if ends_line {
                let line = std::mem::take(&mut state.partial[index]);
                let cut = std::mem::take(&mut state.cut[index]);
                self.emit(stream, &line, cut);
            }
        }
        if accepted.len() < bytes.len() {
            state.silenced = true;
            let rest = std::mem::take(&mut state.partial[index]);
            self.emit(stream, &rest, true);
        }
    }

    fn emit(&self, stream: LogStream, line: &[u8], cut: bool) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        if cut {
            self.sink.line(stream, &format!("{text}{TRUNCATED}"));
        } else {
            self.sink.line(stream, text);
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|e| e.into_inner()));
        if state.silenced {
            return;
        }
        let streams = [LogStream::Stdout, LogStream::Stderr];
        for (stream, rest) in streams.into_iter().zip(state.partial) {
            if !rest.is_empty() {
                self.emit(stream, &rest, false);
            }
        }
    }
}

/// A guest's stdout or stderr.
pub(crate) struct GuestOutput {
    log: Arc<RequestLog>,
    stream: LogStream,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(GuestOutput {
            log: self.log.clone(),
            stream: self.stream,
        })
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.log.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(LogStream, String)>>);

    impl LogSink for Lines {
        fn line(&self, stream: LogStream, line: &str) {
            self.0.lock().unwrap().push((stream, line.to_string()));
        }
    }

    fn log(limits: LogLimits) -> (Arc<Lines>, Arc<RequestLog>) {
        let lines = Arc::new(Lines::default());
        (lines.clone(), RequestLog::new(lines, limits))
    }

    #[test]
    fn splits_lines_across_writes_and_flushes_the_rest_on_drop() {
        let (lines, log) = log(LogLimits::default());
        log.write(LogStream::Stdout, b"hel");
        log.write(LogStream::Stdout, b"lo\nwor");
        log.write(LogStream::Stderr, b"oops\n");
        drop(log);
        let lines = lines.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec![
                (LogStream::Stdout, "hello".to_string()),
                (LogStream::Stderr, "oops".to_string()),
                (LogStream::Stdout, "wor".to_string()),
            ]
        );
    }

    #[test]
    fn bounds_bytes_per_request_and_per_line() {
        let limits = LogLimits {
            max_bytes: 20,
            max_line_bytes: 5,
        };
        let (lines, log) = log(limits);
        log.write(LogStream::Stdout, b"abcdefgh\n");
        log.write(LogStream::Stdout, b"0123456789abcdefghij\n");
        log.write(LogStream::Stdout, b"never seen\n");
        drop(log);
        let lines: Vec<String> = lines
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect();
        assert_eq!(
            lines,
            vec![format!("abcde{TRUNCATED}"), format!("01234{TRUNCATED}")]
        );
    }
}
