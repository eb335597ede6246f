//! The service end to end over its real transports: REST, gRPC, grpc-web, SSE, health, reflection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ScriptedPipeline, poll_final, serve_config, sse_events, start};
use deskgen::api::grpc::pb;
use prost::Message;
use serde_json::{Value, json};
use tonic_types::StatusExt;

async fn post(server: &common::TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(server.url(path)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn priorities_and_turns_on_the_embedded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = ScriptedPipeline::new(1, 1);
    let server = start(serve_config(dir.path(), &common::PRIORITY_KEYS), pipeline.clone()).await;
    common::priorities_and_turns(&server, &pipeline).await;
    server.stop().await;
}

#[tokio::test]
async fn rest_submit_and_poll_returns_the_product_spec_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(3, 5)).await;
    let (status, body) =
        post(&server, "/v1/generate", json!({"initial_image_url": "https://bucket.s3.amazonaws.com/images/12.png", "prompt": "minimal wooden desk setup", "seed": 7})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    let task_id = body["task_id"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&task_id).unwrap().get_version_num(), 4);
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done");
    assert_eq!(result["initial_image_url"], "https://bucket.s3.amazonaws.com/images/12.png");
    assert!(result["processed_image_url"].as_str().unwrap().ends_with(".png"));
    let offers = result["마우스"].as_array().expect("Korean category key at the top level");
    let offer = offers[0].as_object().unwrap();
    let mut fields: Vec<&str> = offer.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(fields, ["category3", "category4", "image", "link", "mall", "price", "title"]);
    assert_eq!(offer["price"], "21990원");
    assert_eq!(result["seed"], 7);

    // The alias paths answer the same.
    let (status, _) = post(&server, "/generate", json!({"prompt": "desk"})).await;
    assert_eq!(status, 202);
    let alias: Value =
        reqwest::get(server.url(&format!("/result/{task_id}"))).await.unwrap().json().await.unwrap();
    assert_eq!(alias["status"], "done");
    server.stop().await;
}

#[tokio::test]
async fn every_validation_rule_has_its_status_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        start(serve_config(dir.path(), &["--max-body-bytes", "4096"]), ScriptedPipeline::new(1, 1)).await;

    let (status, body) = post(&server, "/v1/generate", json!({"prompt": ""})).await;
    assert_eq!((status, body.clone()), (400, json!({"detail": "Prompt must not be empty."})));
    let (status, body2) = post(&server, "/v1/generate", json!({"prompt": "   \n"})).await;
    assert_eq!((status, body2), (400, body));

    let (status, body) = post(&server, "/v1/generate", json!({"prompt": "desk", "guidance_scale": -1})).await;
    assert_eq!(
        (status, body),
        (422, json!({"error_code": "INVALID_INPUT", "message": "Guidance scale cannot be negative."}))
    );

    let cases = [
        (json!({"prompt": "d", "guidance_scale": 31}), "Guidance scale must be at most 30."),
        (json!({"prompt": "d", "num_inference_steps": 0}), "num_inference_steps must be between 1 and 150."),
        (
            json!({"prompt": "d", "num_inference_steps": 151}),
            "num_inference_steps must be between 1 and 150.",
        ),
        (json!({"prompt": "d", "height": 8192}), "height must be a multiple of 8 between 64 and 2048."),
        (json!({"prompt": "d", "width": 100}), "width must be a multiple of 8 between 64 and 2048."),
        (json!({"prompt": "d", "width": 56}), "width must be a multiple of 8 between 64 and 2048."),
        (json!({"prompt": "d", "strength": 0}), "strength must be greater than 0 and at most 1."),
        (json!({"prompt": "d", "strength": 1.5}), "strength must be greater than 0 and at most 1."),
        (
            json!({"prompt": "d", "scheduler": "pndm"}),
            "Unknown scheduler 'pndm'; choose one of: ddim, euler.",
        ),
        (
            json!({"prompt": "d", "max_items_per_category": 11}),
            "max_items_per_category must be between 1 and 10.",
        ),
        (
            json!({"prompt": "d", "max_items_per_category": 0}),
            "max_items_per_category must be between 1 and 10.",
        ),
        (
            json!({"prompt": "d", "loras": [{"name": "cozy", "weight": 0.8}]}),
            "Unknown LoRA 'cozy'; known: none.",
        ),
        (
            json!({"prompt": "d", "webhook_events": ["finished"]}),
            "Unknown webhook event 'finished'; use start, progress or completed.",
        ),
        (
            json!({"prompt": "d", "webhook_url": "ftp://x/y"}),
            "webhook_url must be an absolute https or http URL.",
        ),
        (
            json!({"initial_image_url": "file:///etc/passwd"}),
            "initial_image_url must be an absolute https or http or s3 URL.",
        ),
        (
            json!({"prompt": "d", "task_id": "../etc"}),
            "task_id must be 1 to 128 characters of A-Z, a-z, 0-9, '-', '_' or '.'.",
        ),
        (json!({"prompt": "a\u{0007}b"}), "prompt must not contain control characters."),
        (json!({"negative_prompt": "x"}), "Provide initial_image_url, prompt, or both."),
    ];
    for (request, message) in cases {
        let (status, body) = post(&server, "/v1/generate", request.clone()).await;
        assert_eq!(status, 422, "{request}: {body}");
        assert_eq!(body, json!({"error_code": "INVALID_INPUT", "message": message}), "{request}");
    }

    // Unknown fields and wrong types are 422; malformed JSON and non-objects are 400 with "detail".
    let (status, body) = post(&server, "/v1/generate", json!({"prompt": "d", "colour": "red"})).await;
    assert_eq!(status, 422);
    assert!(body["message"].as_str().unwrap().contains("unknown field `colour`"), "{body}");
    let (status, body) =
        post(&server, "/v1/generate", json!({"prompt": "d", "num_inference_steps": "ten"})).await;
    assert_eq!((status, body["error_code"].as_str()), (422, Some("INVALID_INPUT")));
    let (status, body) = post(&server, "/v1/generate", json!({"prompt": "d", "seed": -1})).await;
    assert_eq!((status, body["error_code"].as_str()), (422, Some("INVALID_INPUT")));
    let (status, body) = common::post_generate(&server, "{\"prompt\": ", None).await;
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().starts_with("Malformed JSON"), "{body}");
    let (status, _) = common::post_generate(&server, "{\"prompt\": NaN}", None).await;
    assert_eq!(status, 400);
    let (status, _) = common::post_generate(&server, "[1, 2]", None).await;
    assert_eq!(status, 400);

    // Over the body limit: 413 with a JSON body.
    let big = json!({"prompt": "x".repeat(10_000)});
    let (status, body) = post(&server, "/v1/generate", big).await;
    assert_eq!((status, body["error_code"].as_str()), (413, Some("INVALID_INPUT")), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn grpc_uses_the_same_validation_with_error_details() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(2, 5)).await;
    let mut client = pb::generate_client::GenerateClient::new(server.grpc_channel().await);

    let status = client
        .generate(pb::GenerateRequest { prompt: Some(" ".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "Prompt must not be empty.");
    let details = status.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "INVALID_INPUT");
    assert_eq!(details.bad_request().unwrap().field_violations[0].field, "prompt");

    let status = client
        .generate(pb::GenerateRequest {
            prompt: Some("desk".into()),
            guidance_scale: Some(-1.0),
            height: Some(8192),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let violations = status.get_error_details().bad_request().unwrap().field_violations.clone();
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["guidance_scale", "height"]);
    assert_eq!(violations[0].description, "Guidance scale cannot be negative.");

    let status = client
        .generate(pb::GenerateRequest {
            prompt: Some("desk".into()),
            guidance_scale: Some(f32::NAN),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A full round trip: Generate, WatchResult to the end, GetResult.
    let submitted = client
        .generate(pb::GenerateRequest { prompt: Some("desk".into()), seed: Some(3), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(submitted.status(), pb::TaskStatus::Queued);
    let mut results = pb::result_client::ResultClient::new(server.grpc_channel().await);
    let mut stream = results
        .watch_result(pb::GetResultRequest { task_id: submitted.task_id.clone(), previews: false })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(update) = stream.message().await.unwrap() {
        seen.push(update);
    }
    let last = seen.last().unwrap();
    assert_eq!(last.status(), pb::TaskStatus::Done);
    assert!(seen.iter().any(|u| u.progress.as_ref().is_some_and(|p| p.stage == "diffusion" && p.steps == 2)));
    assert_eq!(last.recommendations[0].display_name, "마우스");
    assert_eq!(last.recommendations[0].items[0].price, "21990원");
    let got = results
        .get_result(pb::GetResultRequest { task_id: submitted.task_id, previews: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status(), pb::TaskStatus::Done);
    assert_eq!(got.seed, Some(3));

    let missing = results
        .get_result(pb::GetResultRequest { task_id: "nope".into(), previews: false })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(missing.get_error_details().error_info().unwrap().reason, "TASK_NOT_FOUND");
    server.stop().await;
}

fn grpc_web_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Splits a grpc-web response body into data messages and the trailer block.
fn grpc_web_frames(body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers, mut at) = (Vec::new(), String::new(), 0);
    while at + 5 <= body.len() {
        let flag = body[at];
        let len = u32::from_be_bytes(body[at + 1..at + 5].try_into().unwrap()) as usize;
        let payload = body[at + 5..at + 5 + len].to_vec();
        if flag & 0x80 != 0 {
            trailers = String::from_utf8(payload).unwrap();
        } else {
            messages.push(payload);
        }
        at += 5 + len;
    }
    (messages, trailers)
}

#[tokio::test]
async fn grpc_web_unary_and_server_streaming_over_http1() {
    let dir = tempfile::tempdir().unwrap();
    // A page of another origin, allowed in by `*`.
    let flags = ["--cors-allow-origin", "*"];
    let server = start(serve_config(dir.path(), &flags), ScriptedPipeline::new(3, 5)).await;
    let http1 = reqwest::Client::builder().http1_only().build().unwrap();
    let call = |path: &str, frame: Vec<u8>| {
        http1
            .post(server.url(path))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("origin", "http://page.example")
            .body(frame)
            .send()
    };

    let response = call("/deskgen.v1.Info/GetInfo", grpc_web_frame(&pb::GetInfoRequest {})).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let expose = response.headers()["access-control-expose-headers"].to_str().unwrap().to_lowercase();
    assert!(expose.contains("grpc-status") && expose.contains("grpc-status-details-bin"), "{expose}");
    let (messages, trailers) = grpc_web_frames(&response.bytes().await.unwrap());
    let info = pb::InfoResponse::decode(messages[0].as_slice()).unwrap();
    assert_eq!(info.schedulers, ["ddim", "euler"]);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    let frame = grpc_web_frame(&pb::GenerateRequest { prompt: Some("desk".into()), ..Default::default() });
    let (messages, _) =
        grpc_web_frames(&call("/deskgen.v1.Generate/Generate", frame).await.unwrap().bytes().await.unwrap());
    let task_id = pb::GenerateResponse::decode(messages[0].as_slice()).unwrap().task_id;

    let frame = grpc_web_frame(&pb::GetResultRequest { task_id, previews: false });
    let body = call("/deskgen.v1.Result/WatchResult", frame).await.unwrap().bytes().await.unwrap();
    let (messages, trailers) = grpc_web_frames(&body);
    let updates: Vec<pb::TaskResult> =
        messages.iter().map(|m| pb::TaskResult::decode(m.as_slice()).unwrap()).collect();
    assert!(updates.len() >= 2, "progress then the result");
    assert_eq!(updates.last().unwrap().status(), pb::TaskStatus::Done);
    assert!(trailers.contains("grpc-status:0"));

    // CORS preflight as a browser sends it.
    let preflight = http1
        .request(reqwest::Method::OPTIONS, server.url("/deskgen.v1.Generate/Generate"))
        .header("origin", "http://page.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web,authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(preflight.headers().contains_key("access-control-allow-headers"));
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_services_and_health_flips_after_loading() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let pipeline = ScriptedPipeline::new(1, 1);
    let loader: deskgen::server::PipelineLoader = Box::new(move |_store| {
        wait.recv().ok();
        Ok(pipeline as Arc<dyn deskgen::pipeline::Pipeline>)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let running = deskgen::server::start(serve_config(dir.path(), &[]), listener, loader).await.unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest { service: service.into() };
    let status = health.check(check("deskgen.v1.Generate")).await.unwrap().into_inner().status();
    assert_eq!(status, ServingStatus::NotServing);
    let http = reqwest::get(format!("http://{addr}/healthcheck")).await.unwrap();
    assert_eq!(http.status(), 503);
    let (status, body) = {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/v1/generate"))
            .json(&json!({"prompt": "d"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((status, body["error_code"].as_str()), (503, Some("NOT_READY")));

    release.send(()).unwrap();
    let mut serving = false;
    for _ in 0..100 {
        if health.check(check("")).await.unwrap().into_inner().status() == ServingStatus::Serving {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(serving);
    let body: Value = reqwest::get(format!("http://{addr}/healthcheck")).await.unwrap().json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["components"]["storage"], serde_json::json!({"backend": "file", "state": "ok"}));
    assert_eq!(body["components"]["shopping"], serde_json::json!({"provider": "catalog", "state": "ok"}));

    // An object store nothing can be written to takes the node out of service until it is fixed.
    let images = dir.path().join("images");
    let writable = std::fs::metadata(&images).unwrap().permissions();
    let mut read_only = writable.clone();
    read_only.set_readonly(true);
    std::fs::set_permissions(&images, read_only).unwrap();
    let http = reqwest::get(format!("http://{addr}/healthcheck")).await.unwrap();
    assert_eq!(http.status(), 503);
    let body: Value = http.json().await.unwrap();
    assert_eq!(body["components"]["storage"]["state"], "unreachable", "{body}");
    assert!(body["components"]["storage"]["error"].as_str().unwrap().contains("read-only"), "{body}");
    std::fs::set_permissions(&images, writable).unwrap();
    let http = reqwest::get(format!("http://{addr}/healthcheck")).await.unwrap();
    assert_eq!(http.status(), 200);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!() };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["deskgen.v1.Generate", "deskgen.v1.Result", "deskgen.v1.Info", "grpc.health.v1.Health"] {
        assert!(names.contains(&service.to_string()), "{names:?}");
    }
    running.stop().await.unwrap();
}

#[tokio::test]
async fn api_keys_guard_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        serve_config(dir.path(), &["--api-key", "k-one", "--api-key", "k-two"]),
        ScriptedPipeline::new(1, 1),
    )
    .await;
    let client = reqwest::Client::new();
    let submit = |key: Option<&'static str>| {
        let mut r = client.post(server.url("/v1/generate")).json(&json!({"prompt": "desk"}));
        if let Some(key) = key {
            r = r.header("authorization", key);
        }
        r.send()
    };
    let missing = submit(None).await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.json::<Value>().await.unwrap()["error_code"], "UNAUTHENTICATED");
    assert_eq!(submit(Some("Bearer k-wrong")).await.unwrap().status(), 401);
    assert_eq!(submit(Some("k-two")).await.unwrap().status(), 401, "the Bearer scheme is required");
    let ok = submit(Some("Bearer k-two")).await.unwrap();
    assert_eq!(ok.status(), 202);
    let task_id = ok.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_string();
    assert_eq!(client.get(server.url(&format!("/v1/result/{task_id}"))).send().await.unwrap().status(), 401);
    assert_eq!(poll_final(&server, &task_id, Some("k-one")).await["status"], "done");
    // Health, info and metrics stay open.
    for open in ["/healthcheck", "/info", "/metrics", "/openapi.json"] {
        assert_eq!(client.get(server.url(open)).send().await.unwrap().status(), 200, "{open}");
    }

    let channel = server.grpc_channel().await;
    let mut generate = pb::generate_client::GenerateClient::new(channel.clone());
    let request = || pb::GenerateRequest { prompt: Some("desk".into()), ..Default::default() };
    let denied = generate.generate(request()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    let mut forged = tonic::Request::new(request());
    forged.metadata_mut().insert("authorization", "Bearer k-one-but-longer".parse().unwrap());
    assert_eq!(generate.generate(forged).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut allowed = tonic::Request::new(request());
    allowed.metadata_mut().insert("authorization", "Bearer k-one".parse().unwrap());
    assert!(generate.generate(allowed).await.is_ok());
    let mut info = pb::info_client::InfoClient::new(channel);
    assert!(info.get_info(pb::GetInfoRequest {}).await.is_ok(), "Info is open");
    server.stop().await;
}

#[tokio::test]
async fn a_full_queue_refuses_with_429_and_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = ScriptedPipeline::new(1, 1);
    let server = start(serve_config(dir.path(), &["--max-queue-depth", "2"]), pipeline.clone()).await;
    // One task held by the worker, two waiting: the queue is full.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = post(&server, "/v1/generate", json!({"prompt": "hold"})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["task_id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .post(server.url("/v1/generate"))
        .json(&json!({"prompt": "hold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.json::<Value>().await.unwrap()["error_code"], "QUEUE_FULL");
    let mut client = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    let status = client
        .generate(pb::GenerateRequest { prompt: Some("hold".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.get_error_details().error_info().unwrap().reason, "QUEUE_FULL");

    pipeline.gate.add_permits(3);
    for id in &ids {
        assert_eq!(poll_final(&server, id, None).await["status"], "done");
    }
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("deskgen_tasks_rejected_total"), "{metrics}");
    let refused = r#"deskgen_http_requests_total{route="/v1/generate",status="429"}"#;
    assert!(metrics.contains(refused), "the refusal is counted under its route and status: {metrics}");
    assert!(metrics.contains(r#"deskgen_http_request_seconds_count{route="/v1/generate"}"#), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn cancel_queued_and_running_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = ScriptedPipeline::new(200, 20);
    let server = start(serve_config(dir.path(), &[]), pipeline.clone()).await;
    let (_, running) = post(&server, "/v1/generate", json!({"prompt": "long"})).await;
    let (_, queued) = post(&server, "/v1/generate", json!({"prompt": "second"})).await;
    let running = running["task_id"].as_str().unwrap().to_string();
    let queued = queued["task_id"].as_str().unwrap().to_string();

    let (status, body) = post(&server, &format!("/v1/result/{queued}/cancel"), json!({})).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("canceled")), "{body}");
    assert_eq!(body["error_code"], "CANCELED");

    // Wait until the first one is running, then cancel it: it stops within a step.
    for _ in 0..100 {
        let r: Value =
            reqwest::get(server.url(&format!("/v1/result/{running}"))).await.unwrap().json().await.unwrap();
        if r["progress"]["stage"] == "diffusion" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    let mut client = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    let canceled = client.cancel(pb::CancelRequest { task_id: running.clone() }).await.unwrap().into_inner();
    assert_eq!(canceled.status(), pb::TaskStatus::Canceled);
    assert!(started.elapsed() < Duration::from_secs(2));

    let again = client.cancel(pb::CancelRequest { task_id: running }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let (status, body) = post(&server, &format!("/v1/result/{queued}/cancel"), json!({})).await;
    assert_eq!((status, body["error_code"].as_str()), (409, Some("ALREADY_FINISHED")));
    let (status, body) = post(&server, "/v1/result/unknown/cancel", json!({})).await;
    assert_eq!((status, body["error_code"].as_str()), (404, Some("TASK_NOT_FOUND")));
    server.stop().await;
}

#[tokio::test]
async fn resubmitting_a_task_id_returns_the_same_task() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    let request = json!({"prompt": "desk", "task_id": "order-42"});
    let (status, first) = post(&server, "/v1/generate", request.clone()).await;
    assert_eq!((status, first["task_id"].as_str()), (202, Some("order-42")));
    poll_final(&server, "order-42", None).await;
    let (status, again) = post(&server, "/v1/generate", request).await;
    assert_eq!(
        (status, again["task_id"].as_str(), again["status"].as_str()),
        (202, Some("order-42"), Some("done"))
    );
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let submitted = metrics.lines().find(|l| l.starts_with("deskgen_tasks_submitted_total")).unwrap();
    assert!(!submitted.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn prefer_wait_answers_with_the_result_or_falls_back_to_202() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(2, 10)).await;
    let client = reqwest::Client::new();
    let r = client
        .post(server.url("/v1/generate"))
        .header("prefer", "wait=10")
        .json(&json!({"prompt": "desk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["preference-applied"], "wait=10");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "done");

    let r = client
        .post(server.url("/v1/generate"))
        .header("prefer", "wait=10")
        .json(&json!({"prompt": "upload"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["error_code"], "S3_UPLOAD_FAILED");
    assert_eq!(body["message"], "Failed to upload image to S3.");

    let slow =
        start(serve_config(tempfile::tempdir().unwrap().path(), &[]), ScriptedPipeline::new(100, 20)).await;
    let r = client
        .post(slow.url("/v1/generate"))
        .header("prefer", "wait=1")
        .json(&json!({"prompt": "desk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    slow.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn server_sent_events_stream_progress_then_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(4, 20)).await;
    let (_, body) = post(&server, "/v1/generate", json!({"prompt": "desk"})).await;
    let task_id = body["task_id"].as_str().unwrap();
    let events = sse_events(&server, &format!("/v1/result/{task_id}/events")).await;
    let (last_name, last) = events.last().unwrap();
    assert_eq!(*last_name, "result");
    assert_eq!(last["status"], "done");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(name, _)| *name == "progress")
        .filter_map(|(_, e)| e["progress"]["step"].as_u64().filter(|_| e["progress"]["stage"] == "diffusion"))
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]) && !steps.is_empty(), "{steps:?}");
    let missing = reqwest::get(server.url("/v1/result/nope/events")).await.unwrap();
    assert_eq!(missing.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_results_and_runs_queued_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = ScriptedPipeline::new(1, 1);
    let server = start(serve_config(dir.path(), &["--shutdown-grace", "100ms"]), pipeline.clone()).await;
    let (_, done) = post(&server, "/v1/generate", json!({"prompt": "desk"})).await;
    let done = done["task_id"].as_str().unwrap().to_string();
    poll_final(&server, &done, None).await;
    // A held task occupies the worker; two more wait in the queue when the server stops.
    let (_, held) = post(&server, "/v1/generate", json!({"prompt": "hold"})).await;
    let held = held["task_id"].as_str().unwrap().to_string();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (_, body) = post(&server, "/v1/generate", json!({"prompt": "later"})).await;
        waiting.push(body["task_id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await;

    let pipeline = ScriptedPipeline::new(1, 1);
    pipeline.gate.add_permits(1);
    let server = start(serve_config(dir.path(), &[]), pipeline).await;
    assert_eq!(poll_final(&server, &done, None).await["status"], "done");
    for id in waiting.iter().chain([&held]) {
        assert_eq!(poll_final(&server, id, None).await["status"], "done", "{id}");
    }
    server.stop().await;
}

#[tokio::test]
async fn info_metrics_and_openapi_describe_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["queue_backend"], "memory");
    assert_eq!(info["models"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(info["defaults"]["num_inference_steps"], 50);
    assert_eq!(info["defaults"]["height"], 512);
    assert_eq!(info["limits"]["max_side"], 2048);
    let openapi: Value = reqwest::get(server.url("/openapi.json")).await.unwrap().json().await.unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/generate",
        "/v1/result/{task_id}",
        "/v1/result/{task_id}/events",
        "/v1/result/{task_id}/cancel",
        "/healthcheck",
        "/info",
        "/metrics",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "{path} missing from openapi.json");
    }
    server.stop().await;
}
