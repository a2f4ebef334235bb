//! Bodies with limits: the request body a function reads and the response
//! body it writes, each cut off at the function's byte limit. The response
//! body also holds the function's concurrency permit until it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gigafactory_runtime::{HttpError, HyperOutgoingBody};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use super::BoxError;
use super::invoke::BodyEnding;

/// A request body as the router hands it on.
type Incoming = super::Body;

/// The request body as the function reads it: past `limit` bytes the
/// function sees an error and `exceeded` is set (the client gets 413).
pub struct LimitedRequest {
    inner: Incoming,
    budget: Budget,
    exceeded: Arc<AtomicBool>,
}

/// Bytes a body may still carry.
struct Budget {
    remaining: u64,
}

impl Budget {
    /// Counts a frame's data; false once the body is over its limit.
    fn spend(&mut self, frame: &Frame<Bytes>) -> bool {
        let size = frame.data_ref().map_or(0, |data| data.len() as u64);
        match self.remaining.checked_sub(size) {
            Some(left) => {
                self.remaining = left;
                true
            }
            None => false,
        }
    }
}

impl LimitedRequest {
    /// Wraps `inner`; `exceeded` reports whether the limit was hit.
    pub fn new(inner: Incoming, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            budget: Budget { remaining: limit },
            exceeded,
        }
    }
}

impl Body for LimitedRequest {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(http_error(e)))),
            None => return Poll::Ready(None),
        };
        if !self.budget.spend(&frame) {
            self.exceeded.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(HttpError::HttpRequestBodySize(None))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A failure reading the client's body, as the function sees it.
fn http_error(error: axum::Error) -> HttpError {
    match error.into_inner().downcast::<hyper::Error>() {
        Ok(hyper) => HttpError::Hyper(*hyper),
        Err(other) => HttpError::InternalError(Some(other.to_string())),
    }
}

/// The response body as the client receives it: an error (the connection
/// is cut) past `limit` bytes; holds concurrency permits until it is done,
/// and settles the invocation (counted, a cut-off logged) when it ends.
pub struct LimitedResponse {
    inner: HyperOutgoingBody,
    budget: Budget,
    limit: u64,
    /// Bytes sent so far.
    sent: u64,
    ending: BodyEnding,
    _permits: Vec<OwnedSemaphorePermit>,
}

impl LimitedResponse {
    /// Wraps a function's response body, holding `permits` until it ends.
    pub fn new(
        inner: HyperOutgoingBody,
        limit: u64,
        permits: Vec<OwnedSemaphorePermit>,
        ending: BodyEnding,
    ) -> Self {
        Self {
            inner,
            budget: Budget { remaining: limit },
            limit,
            sent: 0,
            ending,
            _permits: permits,
        }
    }
}

impl Drop for LimitedResponse {
    /// hyper stops polling a body once its `Content-Length` is sent, or a
    /// whole body has said so: that is a clean end too. Dropped sooner, the
    /// client left (counted so by the invocation itself).
    fn drop(&mut self) {
        let whole = self.ending.declared == Some(self.sent) || self.inner.is_end_stream();
        if whole {
            self.ending.settle(None);
        }
    }
}

impl Body for LimitedResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                self.ending.settle(Some(e.to_string()));
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            None => {
                self.ending.settle(None);
                return Poll::Ready(None);
            }
        };
        if !self.budget.spend(&frame) {
            let limit = self.limit;
            let error = format!("the function's response is over its {limit}-byte limit");
            self.ending.settle(Some(error.clone()));
            return Poll::Ready(Some(Err(error.into())));
        }
        self.sent += frame.data_ref().map_or(0, |data| data.len() as u64);
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
