//! Runs the repository's MiniLM on a fixed sentence and unwraps every
//! wasi-nn result: any model error, a busy queue included, traps. The
//! gateway must turn a trap after a busy refusal into 503 `model_busy`.

use gigafactory_sdk::http::{Handler, Request, Response};
use gigafactory_sdk::nn::{Graph, Tensor};

/// "[CLS] the quick brown fox [SEP]" in MiniLM's vocabulary.
const IDS: [i64; 6] = [101, 1996, 4248, 2829, 4419, 102];

struct Unwrap;

impl Handler for Unwrap {
    fn handle(_request: Request) -> Response {
        let dims = [1, IDS.len() as u32];
        let graph = Graph::by_name("all-minilm-l6-v2").expect("the model loads");
        let outputs = graph
            .context()
            .and_then(|ctx| {
                ctx.compute(vec![
                    ("input_ids", Tensor::new(&dims, &IDS)),
                    ("attention_mask", Tensor::new(&dims, &[1i64; 6])),
                    ("token_type_ids", Tensor::new(&dims, &[0i64; 6])),
                ])
            })
            .expect("compute succeeds");
        let hidden = outputs.get("last_hidden_state").expect("an output");
        Response::text(200, format!("{:?}\n", hidden.dims()))
    }
}

gigafactory_sdk::export_handler!(Unwrap);
