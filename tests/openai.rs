//! The OpenAI-compatible endpoints, called with the official `openai`
//! Python client (`GIGAFACTORY_TEST_PYTHON`, set up by `./dev test`) and
//! with raw HTTP for what the client hides.

mod support;

use bytes::Bytes;
use hyper::Method;
use support::{Server, assert_error, run_python, text};

const MODEL: &str = "smollm2-135m-instruct";

#[tokio::test]
async fn the_openai_client_chats_streams_and_lists_models() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let base = format!("{}/openai/v1", server.url);
    let report = run_python(
        "openai_client.py",
        vec![base, key.clone(), MODEL.to_string()],
    )
    .await;
    let answer = "The capital of France is Paris.";
    assert_eq!(report["whole"]["content"], answer, "{report}");
    assert_eq!(report["whole"]["role"], "assistant");
    assert_eq!(report["whole"]["finish_reason"], "stop");
    assert_eq!(report["whole"]["completion_tokens"], 7);
    assert_eq!(report["stream"]["content"], answer, "{report}");
    assert_eq!(
        report["stream"]["chunks"], 7,
        "one chunk per token: {report}"
    );
    assert_eq!(report["stream"]["finish_reason"], "stop");
    assert_eq!(report["stream"]["completion_tokens"], 7);
    assert_eq!(report["stop"], "The capital of France");
    assert_eq!(
        report["length"],
        serde_json::json!(["The capital", "length"])
    );
    assert_eq!(
        report["models"],
        serde_json::json!(["all-minilm-l6-v2", MODEL])
    );
    assert_eq!(report["unknown_model"], 404);
    assert_eq!(report["bad_temperature"], 400);
    assert_eq!(report["retrieved"], serde_json::json!([MODEL, "model"]));
    assert_eq!(report["retrieve_unknown"], 404);

    // The base URL clients of other servers are given works the same.
    let usual = format!("{}/v1", server.url);
    let again = run_python(
        "openai_client.py",
        vec![usual, key.clone(), MODEL.to_string()],
    )
    .await;
    assert_eq!(again, report);

    // Messages as tool-calling loops and other clients send them: text
    // parts, an assistant turn with null content, `developer`. Malformed
    // ones are refused with the message at fault, never serde's words.
    let chat = |messages: serde_json::Value| {
        let body = serde_json::json!({"model": MODEL, "messages": messages, "max_tokens": 4});
        let client = server.client(Some(&key));
        async move {
            client
                .send(
                    Method::POST,
                    "/v1/chat/completions",
                    Some(("application/json", Bytes::from(body.to_string()))),
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let accepted = chat(serde_json::json!([
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": null},
        {"role": "user", "content": "What is the capital of France?"},
    ]))
    .await;
    assert_eq!(accepted.status, 200, "{}", text(&accepted));
    for (messages, says) in [
        (serde_json::json!([]), "at least one message"),
        (
            serde_json::json!([{"role": "user", "content": 42}]),
            "not a number",
        ),
        (
            serde_json::json!([{"role": "user", "content": null}]),
            "only an assistant",
        ),
        (
            serde_json::json!([{"role": "robot", "content": "hi"}]),
            "is not one of system",
        ),
        (
            serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            "only text parts",
        ),
    ] {
        let refused = chat(messages.clone()).await;
        assert_error(&refused, 400, "invalid_request");
        let message = text(&refused);
        assert!(message.contains(says), "{messages}: {message}");
        assert!(!message.contains("untagged"), "{message}");
    }
}

/// Tools, structured output, log-probabilities, `n` and legacy
/// completions through the official client, and LangChain on top of it.
#[tokio::test]
async fn applications_call_tools_and_get_structured_answers() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let base = format!("{}/v1", server.url);
    let report = run_python("openai_tools.py", vec![base, key, MODEL.to_string()]).await;
    // Under `auto` the model may call or answer: either way the answer
    // is well formed (calls were checked against their schemas).
    let auto = &report["auto"];
    if auto["calls"].as_array().unwrap().is_empty() {
        assert_eq!(auto["finish_reason"], "stop", "{report}");
        assert_eq!(auto["has_content"], true, "{report}");
    } else {
        assert_eq!(auto["finish_reason"], "tool_calls", "{report}");
    }
    // A required call is made, parses and validates (checked by the
    // script with jsonschema), and is the only content.
    let required = &report["required"];
    assert_eq!(required["calls"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(required["finish_reason"], "tool_calls");
    assert_eq!(required["content"], serde_json::Value::Null);
    assert_eq!(report["named"], serde_json::json!(["get_time"]), "{report}");
    // The tool's result fed back: a text answer, no further call.
    let looped = &report["looped"];
    assert!(
        looped["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{report}"
    );
    assert_eq!(looped["calls"], serde_json::Value::Null);
    assert_eq!(report["streamed_equal"], true, "{report}");
    assert_eq!(report["streamed_finish"], "tool_calls");
    assert!(report["schema_chars"].as_u64().unwrap() >= 1000);
    assert_eq!(report["structured"]["valid"], true);
    assert_eq!(report["structured"]["finish_reason"], "stop", "{report}");
    assert_eq!(report["json_object"], true);
    let logprobs = &report["logprobs"];
    assert_eq!(logprobs["tokens"], true, "{report}");
    assert_eq!(logprobs["count"], logprobs["completion_tokens"], "{report}");
    assert!(logprobs["top"].as_array().unwrap().iter().all(|n| n == 3));
    assert_eq!(logprobs["greedy"], true, "{report}");
    assert_eq!(report["n"]["indexes"], serde_json::json!([0, 1, 2]));
    assert_eq!(report["n"]["seeded"], true, "{report}");
    assert!(report["n"]["completion_tokens"].as_u64().unwrap() >= 3);
    let legacy = &report["legacy"];
    assert_eq!(legacy["object"], "text_completion");
    assert_eq!(legacy["finish_reason"], "length");
    assert_eq!(legacy["tokens"], true, "{report}");
    assert_eq!(legacy["top"], serde_json::json!([2, 2, 2, 2]));
    assert_eq!(legacy["completion_tokens"], 4);
    assert_eq!(report["legacy_list"], serde_json::json!([0, 1]));
    assert_eq!(report["legacy_stream"]["text"], legacy["text"], "{report}");
    assert_eq!(report["legacy_stream"]["completion_tokens"], 4);
    assert_eq!(
        report["langchain_tools"],
        serde_json::json!([{"name": "Weather", "city": true}]),
        "{report}"
    );
    assert_eq!(report["langchain_structured"], "City");
}

/// Every malformed request is refused with a 400 in OpenAI's error shape,
/// naming the field at fault, and generates nothing.
#[tokio::test]
async fn malformed_requests_are_refused_before_generating() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let user = serde_json::json!([{"role": "user", "content": "Hi"}]);
    let weather = serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let chat = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": MODEL, "messages": user});
        for (name, value) in extra.as_object().unwrap() {
            body[name] = value.clone();
        }
        body
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "chat/completions",
            serde_json::json!("not an object"),
            "a string",
        ),
        (
            "chat/completions",
            serde_json::json!({"messages": user}),
            "model",
        ),
        (
            "chat/completions",
            serde_json::json!({"model": 7, "messages": user}),
            "model",
        ),
        (
            "chat/completions",
            serde_json::json!({"model": MODEL}),
            "messages",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": []})),
            "messages",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": "hi"})),
            "messages",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": [{"content": "hi"}]})),
            "messages[0].role",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": [{"role": "robot", "content": "hi"}]})),
            "messages[0].role",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": [{"role": "user", "content": 42}]})),
            "messages[0].content",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": [{"role": "user"}]})),
            "messages[0].content",
        ),
        (
            "chat/completions",
            chat(
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            ),
            "messages[0].content[0]",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"messages": [{"role": "tool", "content": "18"}]})),
            "messages[0].tool_call_id",
        ),
        (
            "chat/completions",
            chat(
                serde_json::json!({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}),
            ),
            "messages[0].tool_calls",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"temperature": 7})),
            "temperature",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"temperature": "hot"})),
            "temperature",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"top_p": 0})),
            "top_p",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"max_tokens": 0})),
            "max_tokens",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"max_tokens": 1.5})),
            "max_tokens",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"max_completion_tokens": -1})),
            "max_completion_tokens",
        ),
        ("chat/completions", chat(serde_json::json!({"n": 0})), "n"),
        ("chat/completions", chat(serde_json::json!({"n": 100})), "n"),
        (
            "chat/completions",
            chat(serde_json::json!({"seed": "x"})),
            "seed",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"stop": 5})),
            "stop",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"stop": [""]})),
            "stop",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"frequency_penalty": 3})),
            "frequency_penalty",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"presence_penalty": -3})),
            "presence_penalty",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"stream": "yes"})),
            "stream",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"top_logprobs": 2})),
            "top_logprobs",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"logprobs": true, "top_logprobs": 50})),
            "top_logprobs",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"tools": {}})),
            "tools",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"tools": [{"type": "retrieval"}]})),
            "tools[0].type",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
            "tools[0].function.name",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"tools": [weather, weather]})),
            "tools[1].function.name",
        ),
        (
            "chat/completions",
            chat(
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
            ),
            "tools[0].function.parameters",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"tools": [weather], "tool_choice": "always"})),
            "tool_choice",
        ),
        (
            "chat/completions",
            chat(
                serde_json::json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ),
            "tool_choice.function.name",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"tool_choice": "required"})),
            "tool_choice",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"response_format": {"type": "xml"}})),
            "response_format.type",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"response_format": {"type": "json_schema"}})),
            "response_format.json_schema",
        ),
        (
            "chat/completions",
            chat(
                serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}),
            ),
            "response_format.json_schema.schema",
        ),
        (
            "chat/completions",
            chat(
                serde_json::json!({"tools": [weather], "response_format": {"type": "json_object"}}),
            ),
            "response_format",
        ),
        ("completions", serde_json::json!({"model": MODEL}), "prompt"),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": [1, 2, 3]}),
            "prompt",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": []}),
            "prompt",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": "a", "logprobs": 9}),
            "logprobs",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": "a", "suffix": "b"}),
            "suffix",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": "a", "best_of": 3}),
            "best_of",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": "a", "echo": true, "logprobs": 1}),
            "echo",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"logit_bias": {"the": 5}})),
            "logit_bias",
        ),
        (
            "chat/completions",
            chat(serde_json::json!({"logit_bias": {"2": 101}})),
            "logit_bias",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": "a", "logit_bias": [1, 2]}),
            "logit_bias",
        ),
        (
            "completions",
            serde_json::json!({"model": MODEL, "prompt": "a", "logit_bias": {"99999999": 1}}),
            "logit_bias",
        ),
    ];
    assert!(cases.len() >= 30);
    let client = server.client(Some(&key));
    // One answer first, so that the model is loaded and counting.
    let warm = chat(serde_json::json!({"max_tokens": 1}));
    let reply = client
        .send(
            Method::POST,
            "/v1/chat/completions",
            Some(("application/json", Bytes::from(warm.to_string()))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let before = server.model(MODEL).await["generation"]["started"].clone();
    assert_eq!(before, 1);
    for (route, body, param) in &cases {
        let reply = client
            .send(
                Method::POST,
                &format!("/v1/{route}"),
                Some(("application/json", Bytes::from(body.to_string()))),
                &[],
            )
            .await
            .unwrap();
        assert_error(&reply, 400, "invalid_request");
        let error = &support::json(&reply)["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            error["param"] == *param || message.contains(param),
            "{body}: expected {param}: {error}"
        );
        assert!(
            !message.contains("untagged") && !message.contains("serde"),
            "{message}"
        );
    }
    // A schema the constraint engine cannot compile is refused too.
    let reply = client
        .send(
            Method::POST,
            "/v1/chat/completions",
            Some((
                "application/json",
                Bytes::from(
                    chat(
                        serde_json::json!({"response_format": {"type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
                    )
                    .to_string(),
                ),
            )),
            &[],
        )
        .await
        .unwrap();
    assert_error(&reply, 400, "invalid_request");
    let after = server.model(MODEL).await["generation"]["started"].clone();
    assert_eq!(before, after, "nothing was generated");
}

#[tokio::test]
async fn logit_bias_forces_and_bans_the_models_tokens() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    // Token 2 is SmolLM2's <|im_end|>, its end of turn.
    let ask = |bias: serde_json::Value| {
        let server = &server;
        let key = &key;
        async move {
            let body = serde_json::json!({
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
                "temperature": 0,
                "max_tokens": 12,
                "logit_bias": bias,
            });
            let reply = server
                .post(
                    key,
                    "/v1/chat/completions",
                    "application/json",
                    body.to_string(),
                )
                .await;
            assert_eq!(reply.status, 200, "{}", text(&reply));
            let reply = support::json(&reply);
            (
                reply["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                reply["choices"][0]["finish_reason"].clone(),
            )
        }
    };
    let (free, finish) = ask(serde_json::json!({})).await;
    assert_eq!(free, "The capital of France is Paris.");
    assert_eq!(finish, "stop");
    let (forced, finish) = ask(serde_json::json!({"2": 100})).await;
    assert_eq!(forced, "", "the end of turn comes first");
    assert_eq!(finish, "stop");
    let (banned, finish) = ask(serde_json::json!({"2": -100})).await;
    assert!(
        banned.starts_with(&free) && banned.len() > free.len(),
        "{banned:?}"
    );
    assert_eq!(finish, "length", "no end of turn");
}

#[tokio::test]
async fn keys_quotas_and_permissions_apply() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let body = |model: &str| {
        let chat = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        });
        Some(("application/json", Bytes::from(chat.to_string())))
    };
    let path = "/openai/v1/chat/completions";
    let anonymous = server
        .client(None)
        .send(Method::POST, path, body(MODEL), &[])
        .await
        .unwrap();
    assert_error(&anonymous, 401, "unauthorized");
    let admin = server
        .admin()
        .send(Method::POST, path, body(MODEL), &[])
        .await
        .unwrap();
    assert_error(&admin, 403, "forbidden");
    let embedder = server
        .client(Some(&key))
        .send(Method::POST, path, body("all-minilm-l6-v2"), &[])
        .await
        .unwrap();
    assert_error(&embedder, 400, "invalid_request");
    let garbage = server
        .client(Some(&key))
        .send(
            Method::POST,
            path,
            Some(("application/json", Bytes::from_static(b"{\"model\": 1}"))),
            &[],
        )
        .await
        .unwrap();
    assert_error(&garbage, 400, "invalid_request");

    // A quota without the model hides it; a rate quota applies here too.
    server
        .set_quota(
            "acme",
            serde_json::json!({"models": ["all-minilm-l6-v2"], "requests_per_second": 1, "burst": 1}),
        )
        .await;
    let hidden = server
        .client(Some(&key))
        .send(Method::POST, path, body(MODEL), &[])
        .await
        .unwrap();
    assert_error(&hidden, 404, "model_not_found");
    let limited = server
        .client(Some(&key))
        .send(Method::POST, path, body(MODEL), &[])
        .await
        .unwrap();
    assert_error(&limited, 429, "too_many_requests");
    let listed = server
        .client(Some(&key))
        .send(Method::GET, "/openai/v1/models", None, &[])
        .await
        .unwrap();
    assert_eq!(listed.status, 200, "{}", text(&listed));
}

#[tokio::test]
async fn generated_tokens_count_against_the_tenant_quota() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "chat", support::wasm("chat")).await;
    let question = serde_json::json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]);
    let openai = || async {
        let chat = serde_json::json!({"model": MODEL, "messages": question, "temperature": 0});
        server
            .post(
                &key,
                "/openai/v1/chat/completions",
                "application/json",
                chat.to_string(),
            )
            .await
    };
    let function = || async {
        let chat = serde_json::json!({"messages": question, "temperature": 0});
        server
            .post(&key, "/fn/acme/chat", "application/json", chat.to_string())
            .await
    };

    // The answer is 7 tokens: a cap of 5 lets one generation run to its
    // end, and refuses the next, over either door.
    server
        .set_quota(
            "acme",
            serde_json::json!({"generated_tokens_per_minute": 5}),
        )
        .await;
    let first = openai().await;
    assert_eq!(first.status, 200, "{}", text(&first));
    assert_eq!(support::json(&first)["usage"]["completion_tokens"], 7);
    let metrics = server.metrics().await;
    let line = format!(
        "gigafactory_text_tenant_generated_tokens_total{{model=\"{MODEL}\",tenant=\"acme\"}} 7"
    );
    assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    let refused = openai().await;
    assert_error(&refused, 429, "too_many_requests");
    let wait: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    let refused = function().await;
    assert_error(&refused, 429, "too_many_requests");
    assert!(
        text(&refused).contains("generated tokens per minute"),
        "{}",
        text(&refused)
    );

    // The tokens are the tenant's: a larger cap admits both again.
    server
        .set_quota(
            "acme",
            serde_json::json!({"generated_tokens_per_minute": 100}),
        )
        .await;
    let again = function().await;
    assert_eq!(again.status, 200, "{}", text(&again));
    assert!(text(&again).contains("event: done"), "{}", text(&again));
    assert_eq!(openai().await.status, 200);
}

#[tokio::test]
async fn frequency_and_presence_penalties_steer_and_are_checked() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let chat = |extra: serde_json::Value| {
        let mut chat = serde_json::json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write the word cat ten times."},
            ],
            "temperature": 0,
            "max_tokens": 24,
        });
        chat.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let server = &server;
        let key = &key;
        async move {
            server
                .post(
                    key,
                    "/openai/v1/chat/completions",
                    "application/json",
                    chat.to_string(),
                )
                .await
        }
    };
    let content = |reply: &support::Reply| {
        assert_eq!(reply.status, 200, "{}", text(reply));
        support::json(reply)["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let plain = content(&chat(serde_json::json!({})).await);
    assert!(plain.matches("cat").count() >= 3, "{plain:?}");
    let penalised = serde_json::json!({"presence_penalty": 2.0, "frequency_penalty": 2.0});
    let steered = content(&chat(penalised.clone()).await);
    eprintln!("greedy: {plain:?}\npenalised: {steered:?}");
    // Each repeat costs more: the answer stops repeating itself.
    assert!(
        steered.matches("cat").count() < plain.matches("cat").count(),
        "{steered:?} vs {plain:?}"
    );
    assert_eq!(
        content(&chat(penalised).await),
        steered,
        "greedy with penalties is still deterministic"
    );
    let refused = chat(serde_json::json!({"presence_penalty": 3.0})).await;
    assert_error(&refused, 400, "invalid_request");
    assert!(
        text(&refused).contains("presence_penalty"),
        "{}",
        text(&refused)
    );
}

/// Browser apps on the origins the operator lists may call the API:
/// preflights are answered, responses carry the origin; other origins
/// get no CORS headers.
#[tokio::test]
async fn browser_apps_call_from_the_allowed_origins() {
    let data = tempfile::tempdir().unwrap();
    let server =
        Server::start_without_models_with(data.path(), &["--cors-origin", "https://app.example"]);
    let key = server.tenant("acme").await;
    let client = server.client(Some(&key));
    let preflight = |origin: &'static str| {
        let client = server.client(None);
        async move {
            client
                .send(
                    Method::OPTIONS,
                    "/v1/chat/completions",
                    None,
                    &[
                        ("origin".into(), origin.into()),
                        ("access-control-request-method".into(), "POST".into()),
                        (
                            "access-control-request-headers".into(),
                            "authorization,content-type".into(),
                        ),
                    ],
                )
                .await
                .unwrap()
        }
    };
    let allowed = preflight("https://app.example").await;
    assert_eq!(allowed.status, 200, "{}", text(&allowed));
    let header = |reply: &support::Reply, name: &str| {
        reply
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        header(&allowed, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert!(
        header(&allowed, "access-control-allow-headers").is_some(),
        "{:?}",
        allowed.headers
    );
    let other = preflight("https://elsewhere.example").await;
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    let listed = client
        .send(
            Method::GET,
            "/v1/models",
            None,
            &[("origin".into(), "https://app.example".into())],
        )
        .await
        .unwrap();
    assert_eq!(listed.status, 200);
    assert_eq!(
        header(&listed, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        header(&listed, "access-control-expose-headers").as_deref(),
        Some("retry-after")
    );
}
