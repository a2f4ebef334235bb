//! `GET /v1/functions/{name}/logs?follow=true`: the recent lines, then
//! every new one as it is written, as NDJSON, until the client leaves or
//! the node drains (the stream then ends cleanly, after a whole line).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};

use super::{Body, Response};
use crate::logs::{FunctionLog, LogLine};

/// A streaming NDJSON response following `log` until `ended`.
pub fn follow(
    log: &Arc<FunctionLog>,
    ended: impl Future<Output = ()> + Send + 'static,
) -> Response {
    let (recent, mut feed) = log.follow();
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for line in recent {
            if sender.send(ndjson(&line)).await.is_err() {
                return;
            }
        }
        tokio::pin!(ended);
        loop {
            let next = tokio::select! {
                next = feed.recv() => next,
                () = &mut ended => return,
            };
            let chunk = match next {
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
    let lines = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(line), receiver))
    });
    hyper::Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("a valid response")
}

fn ndjson(line: &LogLine) -> Bytes {
    let mut text = serde_json::to_string(line).unwrap_or_default();
    text.push('\n');
    Bytes::from(text)
}
