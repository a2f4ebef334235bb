//! A hostile wasi-nn function, written against raw wasi:http and raw wasi-nn
//! bindings so it can misuse both. Model calls use `all-minilm-l6-v2` and
//! answer 200 with `ok <dims of last_hidden_state>` (e.g. `ok [1, 12, 384]`)
//! or `error <wasi-nn code> <message>` (e.g. `error invalid-argument …`).
//! By path:
//!
//! - `/good`: a normal 12-token sentence
//! - `/bad-types`: the sentence with every token type 5 (out of range)
//! - `/bad-mask`: 12 ids and types but an attention mask of 5
//! - `/empty`: all three inputs of dims `[0, 0]`
//! - `/long?tokens=N`: a sentence of N tokens
//! - `/hoard?mb=M&count=C`: holds C tensors of M MiB each, then answers
//!   `held C` (the host should trap it past the memory limit first)
//! - `/long-error?mb=N`: loads a model named N MiB of `x` and fails the
//!   response with `internal-error(<the host's message>)`
//! - `/long-name-trap?mb=N`: the same load, then panics with the message
//! - `/huge-error?mb=N`: fails the response with `internal-error` of its
//!   own N MiB message
//! - `/outbound?url=URL&count=N`: N concurrent GETs of URL (no query of its
//!   own), answering `ok=A denied=D other=O`
//! - anything else: `fine`

mod model;
mod outbound;

use std::io::Write;
use std::str::FromStr;

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct HostileNn;

/// Answers 200 with `text` as the whole body.
fn answer(response_out: ResponseOutparam, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    let body = response.body().expect("body");
    ResponseOutparam::set(response_out, Ok(response));
    {
        let mut stream = body.write().expect("stream");
        stream.write_all(text.as_bytes()).expect("write");
        Write::flush(&mut stream).expect("flush");
    }
    OutgoingBody::finish(body, None).expect("finish");
}

/// The value of `key` in a `k=v&k2=v2` query, parsed.
fn param<T: FromStr>(query: &str, key: &str) -> Option<T> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

impl Guest for HostileNn {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let full_path = request.path_with_query().unwrap_or_default();
        let (path, query) = full_path.split_once('?').unwrap_or((&full_path, ""));
        let mb = || param(query, "mb").unwrap_or(1usize);
        match path {
            "/good" => answer(response_out, &model::good()),
            "/bad-types" => answer(response_out, &model::bad_types()),
            "/bad-mask" => answer(response_out, &model::bad_mask()),
            "/empty" => answer(response_out, &model::empty()),
            "/long" => {
                let tokens = param(query, "tokens").unwrap_or(512);
                answer(response_out, &model::long(tokens));
            }
            "/hoard" => {
                let count = param(query, "count").unwrap_or(1);
                answer(response_out, &model::hoard(mb(), count));
            }
            "/long-error" => {
                let message = model::long_name_error(mb());
                ResponseOutparam::set(response_out, Err(ErrorCode::InternalError(Some(message))));
            }
            "/long-name-trap" => panic!("{}", model::long_name_error(mb())),
            "/huge-error" => {
                let message = "e".repeat(mb() << 20);
                ResponseOutparam::set(response_out, Err(ErrorCode::InternalError(Some(message))));
            }
            "/outbound" => {
                let url: String = param(query, "url").unwrap_or_default();
                let count = param(query, "count").unwrap_or(1);
                // Every response stays alive until the answer is written.
                let (tally, _alive) = outbound::fan_out(&url, count);
                answer(response_out, &tally.to_string());
            }
            _ => answer(response_out, "fine"),
        }
    }
}

wasip2::http::proxy::export!(HostileNn);
