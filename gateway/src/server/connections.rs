//! Connections as a resource: each holds a file descriptor and memory, so
//! their number is capped below the process's descriptor limit. A
//! connection is closed when it has had no request in flight for the idle
//! timeout (bytes alone — pings, settings, dribbled headers — do not keep
//! it open), or when its writes have made no progress for as long (a
//! client that stopped reading its responses). Together with hyper's
//! header-read timeout this bounds what slow or idle clients can hold:
//! half-sent headers, never-sent requests (including the protocol
//! detection that precedes HTTP/1 or HTTP/2), parked keep-alive sockets
//! and unread responses.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Descriptors kept free for everything that is not a client connection:
/// the store, model files, function files, outbound requests, logs.
const DESCRIPTOR_RESERVE: u64 = 256;

/// Past this share of the connection cap, idle connections get only
/// [`CROWDED_IDLE`] before they are closed.
const CROWDED_SHARE: f64 = 0.9;
const CROWDED_IDLE: Duration = Duration::from_secs(1);

/// The shortest wait between a connection's checks of whether to close.
const MIN_CHECK: Duration = Duration::from_millis(100);

/// Raises the soft descriptor limit to the hard one, and returns how many
/// client connections fit under it with a reserve, capped at `wanted`.
pub fn connection_cap(wanted: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_err() {
            tracing::debug!("could not raise the descriptor limit from {soft} to {hard}");
        }
    }
    let descriptors = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let fits = descriptors.saturating_sub(DESCRIPTOR_RESERVE).max(16) / 2;
    wanted.min(usize::try_from(fits).unwrap_or(usize::MAX))
}

/// Open connections, against their cap.
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    cap: usize,
    idle: Duration,
}

impl Connections {
    /// At most `cap` connections, each closed after `idle` without activity.
    pub fn new(cap: usize, idle: Duration) -> Self {
        Self {
            open: AtomicUsize::new(0),
            cap: cap.max(1),
            idle,
        }
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether another connection may be accepted.
    pub fn has_room(&self) -> bool {
        self.open() < self.cap
    }

    /// Counts a connection in; it is counted out when the guard drops.
    pub fn opened(self: &Arc<Self>) -> Opened {
        self.open.fetch_add(1, Ordering::Relaxed);
        Opened(self.clone())
    }

    /// How long a connection may idle now: less when crowded.
    fn idle_limit(&self) -> Duration {
        if self.open() as f64 >= self.cap as f64 * CROWDED_SHARE {
            self.idle.min(CROWDED_IDLE)
        } else {
            self.idle
        }
    }
}

/// One open connection's place under the cap.
pub struct Opened(Arc<Connections>);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a connection is doing: requests in flight (until their response
/// bodies end), when the last one ended, and since when a write waits.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    /// When a request last ended (or the connection opened), in ms since `started`.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// When a write first found the socket full, in ms since `started`
    /// plus one; 0 while writes go through.
    blocked_ms: AtomicU64,
}

impl Activity {
    /// A connection just accepted.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            blocked_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// How long writes have been waiting for the client to read.
    fn blocked_for(&self) -> Duration {
        match self.blocked_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now_ms().saturating_sub(since - 1)),
        }
    }

    fn wrote(&self, progressed: bool) {
        if progressed {
            self.blocked_ms.store(0, Ordering::Relaxed);
        } else if self.blocked_ms.load(Ordering::Relaxed) == 0 {
            self.blocked_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves once the connection should close: no request in flight
    /// for its idle limit, or writes stuck for as long.
    pub async fn idle(&self, connections: &Connections) {
        loop {
            if self.blocked_for() >= connections.idle {
                return;
            }
            let limit = connections.idle_limit();
            let wait = if self.in_flight.load(Ordering::Relaxed) == 0 {
                let idle = self.idle_for();
                if idle >= limit {
                    return;
                }
                limit - idle
            } else {
                limit
            };
            // Checked at least every second: the limit shrinks when crowded,
            // and a write may start waiting meanwhile.
            tokio::time::sleep(wait.clamp(MIN_CHECK, CROWDED_IDLE)).await;
        }
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records when its writes wait for the client to read.
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    /// Wraps `inner`, recording into `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.activity.wrote(!polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(!polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
