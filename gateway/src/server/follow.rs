//! `GET /v1/functions/{name}/logs?follow=true`: the recent lines, then
//! every new one as it is written, as NDJSON, until the client leaves.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::{broadcast, mpsc};

use super::{BoxError, Response};
use crate::logs::{FunctionLog, LogLine};

/// A streaming NDJSON response following `log`.
pub fn follow(log: &Arc<FunctionLog>) -> Response {
    let (recent, mut feed) = log.follow();
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for line in recent {
            if sender.send(ndjson(&line)).await.is_err() {
                return;
            }
        }
        loop {
            let chunk = match feed.recv().await {
                Ok(line) => ndjson(&line),
                Err(broadcast::error::RecvError::Lagged(skipped)) => Bytes::from(format!(
                    "{{\"stream\":\"platform\",\"line\":\"[{skipped} lines skipped]\"}}\n"
                )),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sender.send(chunk).await.is_err() {
                return;
            }
        }
    });
    hyper::Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(http_body_util::BodyExt::boxed_unsync(Lines(receiver)))
        .expect("a valid response")
}

fn ndjson(line: &LogLine) -> Bytes {
    let mut text = serde_json::to_string(line).unwrap_or_default();
    text.push('\n');
    Bytes::from(text)
}

/// A body fed by a channel.
struct Lines(mpsc::Receiver<Bytes>);

impl Body for Lines {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
