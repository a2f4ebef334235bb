//! Sentence embeddings: POST text, get all-MiniLM-L6-v2's 384-d normalised
//! embedding back as JSON.
//!
//! - `text/plain` body: one text → `{"model", "dimensions", "embedding": [...]}`
//! - JSON body `{"texts": ["...", ...]}` → `{"model", "dimensions", "embeddings": [[...], ...]}`
//!
//! Tokenisation runs here in the sandbox; the model runs on the host's
//! shared, resident copy through `wasi:nn` `load-by-name`.

use gigafactory_sdk::http::{Handler, Request, Response};
use gigafactory_sdk::nn::{Graph, Tensor};
use gigafactory_sdk::text::WordPiece;
use serde::Deserialize;

const MODEL: &str = "all-minilm-l6-v2";
/// all-MiniLM-L6-v2's vocabulary, sorted at build time (see build.rs).
static VOCAB: &[(&str, i64)] = include!(concat!(env!("OUT_DIR"), "/vocab_table.rs"));
/// sentence-transformers' limit for this model.
const MAX_TOKENS: usize = 256;
const MAX_TEXTS: usize = 64;

struct Embed;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    texts: Vec<String>,
}

impl Handler for Embed {
    fn handle(request: Request) -> Response {
        match respond(&request) {
            Ok(response) => response,
            Err(response) => response,
        }
    }
}

fn respond(request: &Request) -> Result<Response, Response> {
    if request.method != "POST" {
        return Err(Response::error(
            405,
            "method_not_allowed",
            "POST the text to embed",
        ));
    }
    let is_json = request
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("application/json"));
    let text = request
        .text()
        .map_err(|_| Response::error(400, "bad_request", "the body is not UTF-8"))?;
    if is_json {
        let batch: BatchRequest = serde_json::from_str(text).map_err(|e| {
            Response::error(
                400,
                "bad_request",
                &format!("expected {{\"texts\": [...]}}: {e}"),
            )
        })?;
        if batch.texts.is_empty() || batch.texts.len() > MAX_TEXTS {
            return Err(Response::error(
                400,
                "bad_request",
                &format!("send between 1 and {MAX_TEXTS} texts"),
            ));
        }
        let embeddings = embed(&batch.texts)?;
        Ok(json_response(serde_json::json!({
            "model": MODEL, "dimensions": embeddings[0].len(), "embeddings": embeddings,
        })))
    } else {
        let embedding = embed(&[text.to_string()])?.remove(0);
        Ok(json_response(serde_json::json!({
            "model": MODEL, "dimensions": embedding.len(), "embedding": embedding,
        })))
    }
}

fn json_response(value: serde_json::Value) -> Response {
    Response::json(200, value.to_string())
}

/// Embeds `texts` in one model call: padded to the longest, mean-pooled
/// over the attention mask, L2-normalised.
fn embed(texts: &[String]) -> Result<Vec<Vec<f32>>, Response> {
    let tokenizer =
        WordPiece::from_sorted(VOCAB).map_err(|e| Response::error(500, "tokenizer", &e))?;
    let encodings: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| tokenizer.encode(t, MAX_TOKENS).ids)
        .collect();
    let batch = encodings.len();
    let seq = encodings.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0i64; batch * seq];
    let mut mask = vec![0i64; batch * seq];
    for (row, encoding) in encodings.iter().enumerate() {
        ids[row * seq..row * seq + encoding.len()].copy_from_slice(encoding);
        mask[row * seq..row * seq + encoding.len()].fill(1);
    }
    let dims = [batch as u32, seq as u32];
    let model_error = |e: gigafactory_sdk::nn::Error| {
        if e.is_busy() {
            Response::error(503, "model_busy", &e.to_string()).with_header("retry-after", "1")
        } else {
            Response::error(502, "model_error", &e.to_string())
        }
    };
    let graph = Graph::by_name(MODEL).map_err(model_error)?;
    let outputs = graph
        .context()
        .and_then(|ctx| {
            ctx.compute(vec![
                ("input_ids", Tensor::new(&dims, &ids)),
                ("attention_mask", Tensor::new(&dims, &mask)),
                (
                    "token_type_ids",
                    Tensor::new(&dims, &vec![0i64; batch * seq]),
                ),
            ])
        })
        .map_err(model_error)?;
    let hidden_state = outputs
        .get("last_hidden_state")
        .ok_or_else(|| Response::error(502, "model_error", "no last_hidden_state output"))?;
    let hidden: Vec<f32> = hidden_state.to_vec().map_err(model_error)?;
    let width = hidden.len() / (batch * seq);
    Ok((0..batch)
        .map(|row| {
            let rows = &hidden[row * seq * width..(row + 1) * seq * width];
            mean_pool(rows, &mask[row * seq..(row + 1) * seq], width)
        })
        .collect())
}

fn mean_pool(hidden: &[f32], mask: &[i64], width: usize) -> Vec<f32> {
    let mut sum = vec![0f32; width];
    let mut count = 0f32;
    for (token, &m) in hidden.chunks_exact(width).zip(mask) {
        if m == 1 {
            count += 1.0;
            sum.iter_mut().zip(token).for_each(|(s, v)| *s += v);
        }
    }
    sum.iter_mut().for_each(|s| *s /= count.max(1.0));
    let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|s| *s /= norm);
    sum
}

gigafactory_sdk::export_handler!(Embed);
