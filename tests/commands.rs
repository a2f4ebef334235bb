//! Programs written for other Wasm hosts, served unchanged: a `wasi:cli`
//! command component and a WAGI core module (wasm32-wasip1), both spoken to
//! in CGI — the request in their environment, arguments and stdin, their
//! stdout the response; witx wasi-nn and WasmEdge's GGML programs; WASI 0.3
//! HTTP handlers.

mod support;

use bytes::Bytes;
use hyper::Method;
use support::{Server, assert_error, core_module, json, text, wasm};

#[tokio::test(flavor = "multi_thread")]
async fn command_components_and_wagi_modules_answer_in_cgi() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let manifest = "timeout_ms = 2000\nmemory_mib = 16\n[env]\nGREETING = \"hi\"\n[files]\n\"/fixture/data.txt\" = \"data.txt\"\n";
    let files = vec![("data.txt".to_string(), b"from the bundle".to_vec())];
    // wasi:cli 0.2's `exit` says only success or failure (1); preview 1's
    // `proc_exit` carries the status.
    for (name, binary, kind, status) in [
        ("command", wasm("cgi_echo"), "command", 1),
        ("wagi", core_module("cgi_echo"), "wagi", 3),
    ] {
        let bundle =
            gigafactory_gateway::bundle::Bundle::pack(&binary, Some(manifest), &files).unwrap();
        let deployed = server.deploy_bundle(&key, name, bundle).await;
        assert_eq!(deployed.status, 201, "{}", text(&deployed));
        let client = server.client(Some(&key));
        let described = client
            .api(Method::GET, &format!("/v1/functions/{name}"), None)
            .await
            .unwrap();
        assert_eq!(described["kind"], kind, "{described}");

        let route = format!("/fn/acme/{name}");
        let echoed = client
            .send(
                Method::POST,
                &format!("{route}/echo?top=3&label=a%20b"),
                Some(("text/csv", Bytes::from_static(b"a,b\n1,2"))),
                &[("x-greeting".into(), "hello".into())],
            )
            .await
            .unwrap();
        assert_eq!(echoed.status, 200, "{name}: {}", text(&echoed));
        assert_eq!(echoed.headers["content-type"], "text/plain");
        let expected = format!(
            "REQUEST_METHOD=POST\nPATH_INFO=/echo\nQUERY_STRING=top=3&label=a%20b\n\
             CONTENT_TYPE=text/csv\nCONTENT_LENGTH=7\nSCRIPT_NAME={route}\n\
             X_MATCHED_ROUTE={route}/...\nHTTP_X_GREETING=hello\nGREETING=hi\n\
             args={route}/echo|top=3|label=a b\nbody=a,b\n1,2"
        );
        assert_eq!(text(&echoed), expected, "{name}");

        let created = client
            .send(Method::GET, &format!("{route}/created"), None, &[])
            .await
            .unwrap();
        assert_eq!(created.status, 201, "{name}: {}", text(&created));
        assert_eq!(created.headers["content-type"], "application/json");
        assert_eq!(created.headers["x-kind"], "cgi");
        assert_eq!(json(&created)["made"], true);

        let moved = client
            .send(Method::GET, &format!("{route}/moved"), None, &[])
            .await
            .unwrap();
        assert_eq!(moved.status, 302, "{name}");
        assert_eq!(moved.headers["location"], "https://example.com/elsewhere");

        let plain = server.get_text(&key, &format!("{route}/plain")).await;
        assert_eq!(plain, "no header block here, just text");

        let file = client
            .send(Method::GET, &format!("{route}/file"), None, &[])
            .await
            .unwrap();
        let log = || async {
            client
                .api(Method::GET, &format!("/v1/functions/{name}/logs"), None)
                .await
                .unwrap()["lines"]
                .to_string()
        };
        assert_eq!(
            text(&file),
            "from the bundle",
            "{name}: relative paths reach the bundle: {}",
            log().await
        );

        let failed = client
            .send(Method::GET, &format!("{route}/fail"), None, &[])
            .await
            .unwrap();
        assert_error(&failed, 500, "function_exited");
        let exited = format!("exited with status {status}");
        assert!(text(&failed).contains(&exited), "{}", text(&failed));
        let trapped = client
            .send(Method::GET, &format!("{route}/trap"), None, &[])
            .await
            .unwrap();
        assert_error(&trapped, 500, "function_trapped");
        // Stdout is held up to the memory limit (16 MiB here), no further:
        // the write past it fails, and this program panics.
        let flooded = client
            .send(Method::GET, &format!("{route}/flood"), None, &[])
            .await
            .unwrap();
        assert_error(&flooded, 500, "function_trapped");
        let spun = client
            .send(Method::GET, &format!("{route}/spin"), None, &[])
            .await
            .unwrap();
        assert_error(&spun, 504, "deadline_exceeded");

        let logs = client
            .api(Method::GET, &format!("/v1/functions/{name}/logs"), None)
            .await
            .unwrap();
        let lines = logs["lines"].to_string();
        assert!(
            lines.contains("cgi_echo: failing on purpose"),
            "{name}: stderr in the log: {lines}"
        );
        assert!(lines.contains(&exited), "{name}: {lines}");
        assert!(
            lines.contains("index out of bounds"),
            "{name}: the panic: {lines}"
        );
    }
    // Counted like any function.
    let metrics = server.metrics().await;
    for outcome in [
        "ok",
        "function_exited",
        "function_trapped",
        "deadline_exceeded",
    ] {
        let line = format!(
            "gigafactory_function_requests_total{{tenant=\"acme\",function=\"wagi\",outcome=\"{outcome}\"}}"
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_of_older_toolchains_run_on_wasi_preview_0() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let module = wat::parse_str(
        r#"(module
            (import "wasi_unstable" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "Content-Type: text/plain\n\nfrom preview 0")
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 16))
                (i32.store (i32.const 4) (i32.const 40))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .unwrap();
    server.deploy(&key, "old", module).await;
    assert_eq!(
        server.get_text(&key, "/fn/acme/old").await,
        "from preview 0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn core_modules_use_witx_wasi_nn_over_the_shared_pool() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "witx", core_module("nn_witx")).await;
    let answer = server.get_text(&key, "/fn/acme/witx").await;
    // errno 0 for every call, y = x + x, then: the buffer too small
    // (too_large 7), no output 9 (invalid_argument 1), token-by-token on a
    // tensor graph (unsupported_operation 6), an unknown model (not_found
    // 8), an unknown tensor type (1), an OpenVINO graph (invalid_encoding
    // 2), a finalized context and an unloaded graph (1).
    assert_eq!(
        answer,
        "load 0\ninit 0\nset 0,0,0,0,0,0\ncompute 0\ny_fp32 0 2.5,-6\n\
         y_i64 0 -14,2199023255552\nerrors small=7 missing=1 single=6 unknown=8 \
         type=1 encoding=2 finalized=0 after=1 unloaded=0 twice=1\n"
    );
    // A repository model by name runs on the shared pool, as a
    // component's call does: [1, 3, 384] f32 back, counted by the model.
    let calls = || async {
        server.model("all-minilm-l6-v2").await["stats"]["calls"]
            .as_u64()
            .unwrap()
    };
    let before = calls().await;
    let answer = server.get_text(&key, "/fn/acme/witx?minilm").await;
    assert_eq!(answer, "minilm 0 0 0,0,0 0 0 4608\n");
    assert_eq!(calls().await, before + 1);

    // A program written with the `wasi-nn` crate's witx bindings, unchanged:
    // its embedding of "hello world" ([CLS] hello world [SEP]) equals the
    // one the `embed` example computes through the WIT interface.
    let manifest = "[files]\n\"/fixture/tiny.onnx\" = \"tiny.onnx\"\n";
    let tiny = std::fs::read(support::root().join("tests/data/tiny.onnx")).unwrap();
    let bundle = gigafactory_gateway::bundle::Bundle::pack(
        &core_module("witx_embed"),
        Some(manifest),
        &[("tiny.onnx".to_string(), tiny)],
    )
    .unwrap();
    let deployed = server.deploy_bundle(&key, "crate", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    server.deploy(&key, "embed", wasm("embed")).await;
    let post = |path: &'static str, body: &'static str| {
        let client = server.client(Some(&key));
        async move {
            let reply = client
                .send(
                    Method::POST,
                    path,
                    Some(("text/plain", Bytes::from(body))),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{path}: {}", text(&reply));
            json(&reply)
        }
    };
    let witx = support::floats(&post("/fn/acme/crate", "101 7592 2088 102").await);
    let wit = support::floats(&post("/fn/acme/embed", "hello world").await["embedding"]);
    assert_eq!(witx.len(), 384);
    let difference = support::largest_difference(&witx, &wit);
    assert!(
        difference < 1e-5,
        "the witx and WIT embeddings differ by {difference}"
    );
    // Its bundle's file, loaded with `build_from_files` (witx `load`).
    assert_eq!(
        server.get_text(&key, "/fn/acme/crate?file").await,
        "y 8 2.5,-6"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wasmedge_llm_programs_generate_through_the_shared_scheduler() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let manifest = "[model_aliases]\ndefault = \"smollm2-135m-instruct\"\n";
    let bundle =
        gigafactory_gateway::bundle::Bundle::pack(&core_module("nn_witx"), Some(manifest), &[])
            .unwrap();
    let deployed = server.deploy_bundle(&key, "llm", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let answer = server.get_text(&key, "/fn/acme/llm?ggml").await;
    // Greedy: the reference answer whole, then the same token by token
    // (7 pieces, then end_of_sequence 100); an unknown name is not_found
    // (8), a config that is not JSON and a third input invalid (1).
    let usage =
        "{\"input_tokens\":16,\"output_tokens\":7,\"llama_build_number\":0,\"llama_commit\":\"\"}";
    assert_eq!(
        answer,
        format!(
            "whole 0 0 0 0 0 The capital of France is Paris.\nusage 0 {usage}\n\
             stream 100 7 The capital of France is Paris. 0\nstream usage {usage}\n\
             errors unknown=8 config=1 input=1\n"
        )
    );
    // Both generations ran on the model's scheduler, counted for the tenant.
    let metrics = server.metrics().await;
    let line = "gigafactory_text_tenant_generated_tokens_total{model=\"smollm2-135m-instruct\",tenant=\"acme\"} 14";
    assert!(metrics.contains(line), "no {line:?} in\n{metrics}");

    // A chat program written with the `wasmedge-wasi-nn` crate, unchanged:
    // its greedy answer, whole and streamed token by token, is the one the
    // `chat` example gets through `gigafactory:ai`.
    let bundle = gigafactory_gateway::bundle::Bundle::pack(
        &core_module("wasmedge_chat"),
        Some(manifest),
        &[],
    )
    .unwrap();
    let deployed = server.deploy_bundle(&key, "llamaedge", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let question = "What is the capital of France?";
    let reply = server
        .client(Some(&key))
        .send(
            Method::POST,
            "/fn/acme/llamaedge",
            Some(("text/plain", Bytes::from(question))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let printed = text(&reply);
    let field = |name: &str| {
        printed
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} in {printed}"))
            .to_string()
    };
    server.deploy(&key, "chat", wasm("chat")).await;
    let chat = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
    });
    let reply = server
        .client(Some(&key))
        .send(
            Method::POST,
            "/fn/acme/chat",
            Some(("application/json", Bytes::from(chat.to_string()))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let reference: String = text(&reply)
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|data| data["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(reference, "The capital of France is Paris.");
    assert_eq!(field("whole: "), reference);
    assert_eq!(field("stream: "), reference);
    assert_eq!(field("pieces: "), "7");
    let usage: serde_json::Value = serde_json::from_str(&field("usage: ")).unwrap();
    assert_eq!(usage["output_tokens"], 7, "{usage}");
}

/// Sends a chunked request body in two parts, the second only once the
/// echo of the first has come back; returns what came back in all.
async fn echo_while_sending(server: &Server, key: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.address())
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nfirst\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let wait = std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&received).contains("first") {
        let n = tokio::time::timeout(wait, stream.read(&mut buffer))
            .await
            .expect("the first part echoed before the request ended")
            .unwrap();
        assert!(
            n > 0,
            "closed early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..n]);
    }
    stream.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    tokio::time::timeout(wait, stream.read_to_end(&mut received))
        .await
        .expect("the response ends")
        .unwrap();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_0_3_handlers_stream_and_use_the_host_interfaces() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "p3", wasm("http_p3")).await;
    let client = server.client(Some(&key));
    let described = client
        .api(Method::GET, "/v1/functions/p3", None)
        .await
        .unwrap();
    assert_eq!(described["kind"], "http-0.3", "{described}");

    assert_eq!(
        server.get_text(&key, "/fn/acme/p3/hi?x=1").await,
        "Hello from Gigafactory over WASI 0.3! You asked for /hi?x=1\n"
    );
    assert_eq!(
        server.get_text(&key, "/fn/acme/p3/count?n=5").await,
        "0\n1\n2\n3\n4\n"
    );
    // 3 MiB through and back.
    let body: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let echoed = client
        .send(
            Method::POST,
            "/fn/acme/p3/echo",
            Some(("application/octet-stream", Bytes::from(body.clone()))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(echoed.status, 200, "{}", text(&echoed));
    assert!(echoed.body == body, "{} bytes came back", echoed.body.len());
    // Both ways at once: the first part comes back before the second is sent.
    let exchange = echo_while_sending(&server, &key, "/fn/acme/p3/echo").await;
    assert!(exchange.starts_with("HTTP/1.1 200"), "{exchange}");
    let decoded: String = exchange
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .skip(1)
        .step_by(2)
        .collect();
    assert_eq!(decoded, "firstsecond", "{exchange}");

    // wasi:nn and gigafactory:ai, as a 0.2 handler has them.
    assert_eq!(server.get_text(&key, "/fn/acme/p3/nn").await, "y 2.5,-6");
    server.deploy(&key, "embed02", wasm("ai_embed")).await;
    let reply = client
        .send(
            Method::POST,
            "/fn/acme/embed02",
            Some(("text/plain", Bytes::from("hello world"))),
            &[],
        )
        .await
        .unwrap();
    let reference = support::floats(&json(&reply)["vectors"][0]);
    let reply = client
        .send(Method::GET, "/fn/acme/p3/ai", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let vector = support::floats(&json(&reply));
    assert_eq!(vector.len(), 384);
    assert!(support::largest_difference(&vector, &reference) < 1e-6);

    let trapped = client
        .send(Method::GET, "/fn/acme/p3/trap", None, &[])
        .await
        .unwrap();
    assert_error(&trapped, 500, "function_trapped");

    // Still writing at its deadline: the body is cut off with an error, so
    // the client cannot take it for a whole one.
    let bundle = gigafactory_gateway::bundle::Bundle::pack(
        &wasm("http_p3"),
        Some("timeout_ms = 500\n"),
        &[],
    )
    .unwrap();
    let deployed = server.deploy_bundle(&key, "p3-short", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let cut = client
        .send(
            Method::GET,
            "/fn/acme/p3-short/count?n=4000000000",
            None,
            &[],
        )
        .await;
    assert!(cut.is_err(), "a cut-off body arrived as a whole one");
    // Counted as its deadline, not as a success, and told in its log.
    let counted = "gigafactory_function_requests_total{tenant=\"acme\",function=\"p3-short\",outcome=\"deadline_exceeded\"} 1";
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = server.metrics().await;
        if metrics.contains(counted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(metrics.contains(counted), "{metrics}");
    assert!(
        !metrics.contains("function=\"p3-short\",outcome=\"ok\""),
        "{metrics}"
    );
    let logs = client
        .api(Method::GET, "/v1/functions/p3-short/logs", None)
        .await
        .unwrap();
    assert!(
        logs.to_string()
            .contains("the response was cut off after it began"),
        "{logs}"
    );
}
