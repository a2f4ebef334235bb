//! A component written against the Spin SDK, as a Spin user would: `POST
//! /infer` (body: prompt) answers `infer`'s text and token counts;
//! `POST /embed` (body: lines) answers the embeddings as JSON. Spin errors
//! come back as 500 with their Debug form.

use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;
use spin_sdk::llm::{self, EmbeddingModel, InferencingModel, InferencingParams};

#[http_component]
fn handle(request: Request) -> anyhow::Result<impl IntoResponse> {
    let body = String::from_utf8(request.body().to_vec())?;
    let answer = if request.path().ends_with("/infer") {
        let greedy = InferencingParams {
            max_tokens: 64,
            repeat_penalty: 1.0,
            repeat_penalty_last_n_token_count: 64,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.9,
        };
        llm::infer_with_options(
            InferencingModel::Other("smollm2-135m-instruct"),
            &body,
            greedy,
        )
        .map(|result| {
            format!(
                "{{\"text\": {:?}, \"prompt_tokens\": {}, \"generated_tokens\": {}}}",
                result.text, result.usage.prompt_token_count, result.usage.generated_token_count
            )
        })
    } else if request.path().ends_with("/infer-defaults") {
        llm::infer(InferencingModel::Other("smollm2-135m-instruct"), &body).map(|result| {
            format!(
                "{{\"generated_tokens\": {}}}",
                result.usage.generated_token_count
            )
        })
    } else {
        let texts: Vec<String> = body.lines().map(str::to_string).collect();
        llm::generate_embeddings(EmbeddingModel::AllMiniLmL6V2, &texts).map(|result| {
            let vectors: Vec<String> = result.embeddings.iter().map(|v| format!("{v:?}")).collect();
            format!(
                "{{\"vectors\": [{}], \"prompt_tokens\": {}}}",
                vectors.join(","),
                result.usage.prompt_token_count
            )
        })
    };
    Ok(match answer {
        Ok(json) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(json)
            .build(),
        Err(error) => Response::new(500, format!("{error:?}")),
    })
}
