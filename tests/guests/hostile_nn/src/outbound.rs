//! `/outbound`: many outgoing requests at once, every one kept open.

use std::fmt;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingResponse, Method, OutgoingRequest, Scheme,
};

/// How the requests ended.
#[derive(Default)]
pub struct Tally {
    ok: usize,
    denied: usize,
    other: usize,
}

impl Tally {
    fn failed(&mut self, code: &ErrorCode) {
        match code {
            ErrorCode::HttpRequestDenied | ErrorCode::ConnectionLimitReached => self.denied += 1,
            _ => self.other += 1,
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok={} denied={} other={}",
            self.ok, self.denied, self.other
        )
    }
}

/// What must outlive the answer: the pending futures and the responses
/// whose bodies were never read.
pub type Alive = (Vec<FutureIncomingResponse>, Vec<IncomingResponse>);

/// Starts `count` GETs of `url` together, then waits for each in turn.
pub fn fan_out(url: &str, count: usize) -> (Tally, Alive) {
    let mut tally = Tally::default();
    let mut pending = Vec::new();
    for _ in 0..count {
        match outgoing_handler::handle(get(url), None) {
            Ok(future) => pending.push(future),
            Err(code) => tally.failed(&code),
        }
    }
    let mut responses = Vec::new();
    for future in &pending {
        future.subscribe().block();
        match future.get() {
            Some(Ok(Ok(response))) => {
                tally.ok += 1;
                responses.push(response);
            }
            Some(Ok(Err(code))) => tally.failed(&code),
            Some(Err(())) | None => tally.other += 1,
        }
    }
    (tally, (pending, responses))
}

/// A GET of `url` (`http://authority/path` or `https://…`).
fn get(url: &str) -> OutgoingRequest {
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", rest)) => (Scheme::Https, rest),
        Some((_, rest)) => (Scheme::Http, rest),
        None => (Scheme::Http, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_method(&Method::Get);
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    request
}
