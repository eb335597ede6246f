//! Hostile input, each case with the code it must get: malformed and out-of-range requests, huge
//! bodies, control characters, forged keys and broken metadata over REST, gRPC and grpc-web, and
//! photo and webhook URLs that try to reach into the server's own network.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use common::{
    ScriptedPipeline, TestServer, poll_final, post_generate, serve_config, start, start_real_guarded,
};
use deskgen::api::grpc::pb;
use prost::Message;
use serde_json::{Value, json};
use tonic::metadata::AsciiMetadataValue;
use tonic_types::StatusExt;

const KEY: &str = "k3y-for-hostile-tests";

/// What a REST answer must be: a status and, for errors, the body's code (or the spec's "detail").
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Accepted,
    Detail,
    Invalid,
    TooLarge,
}

impl Expect {
    fn check(self, case: &str, status: u16, body: &Value) {
        match self {
            Expect::Accepted => assert_eq!(status, 202, "{case}: {body}"),
            Expect::Detail => {
                assert_eq!(status, 400, "{case}: {body}");
                assert!(body["detail"].is_string(), "{case}: {body}");
            }
            Expect::Invalid => {
                assert_eq!(status, 422, "{case}: {body}");
                assert_eq!(body["error_code"], "INVALID_INPUT", "{case}: {body}");
            }
            Expect::TooLarge => {
                assert_eq!(status, 413, "{case}: {body}");
                assert_eq!(body["error_code"], "INVALID_INPUT", "{case}: {body}");
            }
        }
    }
}

#[tokio::test]
async fn hostile_rest_bodies_get_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &["--api-key", KEY]), ScriptedPipeline::new(1, 1)).await;
    use Expect::*;
    let cases: Vec<(&str, String, Expect)> = vec![
        ("empty prompt", r#"{"prompt": ""}"#.into(), Detail),
        ("blank prompt", r#"{"prompt": " \t\n\u3000"}"#.into(), Detail),
        ("blank prompt beside broken rules", r#"{"prompt": " ", "num_inference_steps": -5}"#.into(), Detail),
        ("steps past i64", r#"{"prompt": "d", "num_inference_steps": 99999999999999999999}"#.into(), Invalid),
        (
            "steps at i64::MAX",
            r#"{"prompt": "d", "num_inference_steps": 9223372036854775807}"#.into(),
            Invalid,
        ),
        ("steps as 1e3", r#"{"prompt": "d", "num_inference_steps": 1e3}"#.into(), Invalid),
        ("steps fractional", r#"{"prompt": "d", "num_inference_steps": 2.5}"#.into(), Invalid),
        ("height past i32", r#"{"prompt": "d", "height": 4294967296}"#.into(), Invalid),
        ("width at i64::MIN", r#"{"prompt": "d", "width": -9223372036854775808}"#.into(), Invalid),
        ("guidance 1e308", r#"{"prompt": "d", "guidance_scale": 1e308}"#.into(), Invalid),
        ("guidance overflowing f64", r#"{"prompt": "d", "guidance_scale": 1e999}"#.into(), Detail),
        ("seed past u64", r#"{"prompt": "d", "seed": 18446744073709551616}"#.into(), Invalid),
        ("seed at u64::MAX", r#"{"prompt": "d", "seed": 18446744073709551615}"#.into(), Accepted),
        ("negative steps", r#"{"prompt": "d", "num_inference_steps": -1}"#.into(), Invalid),
        ("negative width", r#"{"prompt": "d", "width": -512}"#.into(), Invalid),
        ("negative guidance", r#"{"prompt": "d", "guidance_scale": -0.0001}"#.into(), Invalid),
        ("negative strength", r#"{"prompt": "d", "strength": -0.5}"#.into(), Invalid),
        ("negative items", r#"{"prompt": "d", "max_items_per_category": -3}"#.into(), Invalid),
        ("negative seed", r#"{"prompt": "d", "seed": -1}"#.into(), Invalid),
        (
            "negative LoRA weight past the limit",
            r#"{"prompt": "d", "loras": [{"name": "x", "weight": -1e9}]}"#.into(),
            Invalid,
        ),
        ("NaN literal", r#"{"prompt": "d", "guidance_scale": NaN}"#.into(), Detail),
        ("Infinity literal", r#"{"prompt": "d", "strength": Infinity}"#.into(), Detail),
        ("NaN as a string", r#"{"prompt": "d", "guidance_scale": "NaN"}"#.into(), Invalid),
        ("prompt as a number", r#"{"prompt": 123}"#.into(), Invalid),
        ("prompt as an object", r#"{"prompt": {"text": "d"}}"#.into(), Invalid),
        ("prompt as null", r#"{"prompt": null}"#.into(), Invalid),
        ("steps as a string", r#"{"prompt": "d", "num_inference_steps": "10"}"#.into(), Invalid),
        ("steps as a bool", r#"{"prompt": "d", "num_inference_steps": true}"#.into(), Invalid),
        ("loras as a string", r#"{"prompt": "d", "loras": "cozy"}"#.into(), Invalid),
        ("events as a string", r#"{"prompt": "d", "webhook_events": "start"}"#.into(), Invalid),
        ("unknown field", r#"{"prompt": "d", "__proto__": {}}"#.into(), Invalid),
        ("duplicate field", r#"{"prompt": "d", "prompt": "e"}"#.into(), Invalid),
        ("array body", "[]".into(), Detail),
        ("string body", r#""prompt""#.into(), Detail),
        ("null body", "null".into(), Detail),
        ("empty body", "".into(), Detail),
        ("truncated JSON", r#"{"prompt": "d""#.into(), Detail),
        ("deeply nested JSON", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)), Detail),
        ("NUL in prompt", r#"{"prompt": "desk\u0000setup"}"#.into(), Invalid),
        ("ANSI escape in prompt", r#"{"prompt": "\u001b[31mred"}"#.into(), Invalid),
        ("C1 control in prompt", r#"{"prompt": "desk\u0085"}"#.into(), Invalid),
        ("DEL in negative prompt", r#"{"prompt": "d", "negative_prompt": "x\u007f"}"#.into(), Invalid),
        ("control char in task_id", r#"{"prompt": "d", "task_id": "a\u0001b"}"#.into(), Invalid),
        ("unicode task_id", r#"{"prompt": "d", "task_id": "작업"}"#.into(), Invalid),
        ("lone surrogate", r#"{"prompt": "\ud800"}"#.into(), Detail),
        ("newlines and tabs are text", r#"{"prompt": "desk\n\twith lamp"}"#.into(), Accepted),
        ("Korean and emoji are text", r#"{"prompt": "책상 🖥️ 정리"}"#.into(), Accepted),
        ("prompt over 10,000 characters", format!(r#"{{"prompt": "{}"}}"#, "가".repeat(10_001)), Invalid),
        ("file scheme", r#"{"initial_image_url": "file:///etc/passwd"}"#.into(), Invalid),
        ("gopher scheme", r#"{"initial_image_url": "gopher://127.0.0.1:6379/_FLUSHALL"}"#.into(), Invalid),
        ("data URL", r#"{"initial_image_url": "data:image/png;base64,iVBORw0KGgo="}"#.into(), Invalid),
        ("javascript URL", r#"{"prompt": "d", "webhook_url": "javascript:alert(1)"}"#.into(), Invalid),
        ("relative URL", r#"{"initial_image_url": "/etc/passwd"}"#.into(), Invalid),
        (
            "URL over 2048 bytes",
            format!(r#"{{"initial_image_url": "https://example.com/{}"}}"#, "a".repeat(2100)),
            Invalid,
        ),
        ("10 MB JSON", format!(r#"{{"prompt": "{}"}}"#, "x".repeat(10 << 20)), TooLarge),
    ];
    for (case, body, expect) in cases {
        let (status, answer) = post_generate(&server, body, Some(KEY)).await;
        expect.check(case, status, &answer);
    }

    // The same 10 MB without a Content-Length (chunked): cut off at the limit, not buffered whole.
    let chunk = bytes::Bytes::from(vec![b' '; 1 << 20]);
    let stream = futures::stream::iter((0..10).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let (status, answer) = post_generate(&server, reqwest::Body::wrap_stream(stream), Some(KEY)).await;
    Expect::TooLarge.check("10 MB chunked", status, &answer);

    // Invalid UTF-8 inside a JSON string.
    let (status, answer) =
        post_generate(&server, b"{\"prompt\": \"desk \xff\xfe\"}".to_vec(), Some(KEY)).await;
    Expect::Detail.check("invalid UTF-8 in the body", status, &answer);
    server.stop().await;
}

#[tokio::test]
async fn missing_and_forged_api_keys_are_refused_on_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &["--api-key", KEY]), ScriptedPipeline::new(1, 1)).await;
    let client = reqwest::Client::new();
    let forged: Vec<Option<Vec<u8>>> = vec![
        None,
        Some(b"".to_vec()),
        Some(b"Bearer".to_vec()),
        Some(b"Bearer ".to_vec()),
        Some(format!("Bearer {}", &KEY[..KEY.len() - 1]).into_bytes()),
        Some(format!("Bearer {KEY}x").into_bytes()),
        Some(format!("Basic {KEY}").into_bytes()),
        Some(KEY.as_bytes().to_vec()),
        Some(format!("Bearer {}", KEY.to_uppercase()).into_bytes()),
        Some(b"Bearer \xff\xfe\xfd".to_vec()),
        Some([b"Bearer ".as_slice(), KEY.as_bytes(), b"\xc3"].concat()),
    ];
    for auth in &forged {
        let mut request = client.post(server.url("/v1/generate")).json(&json!({"prompt": "d"}));
        if let Some(value) = auth {
            request = request.header(header::AUTHORIZATION, header::HeaderValue::from_bytes(value).unwrap());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error_code"], "UNAUTHENTICATED");
    }

    // Native gRPC over HTTP/2: the same keys, metadata bytes that are not UTF-8 included.
    let channel = server.grpc_channel().await;
    for auth in &forged {
        let mut request = tonic::Request::new(pb::GetResultRequest { task_id: "x".into(), previews: false });
        if let Some(value) = auth {
            let value = AsciiMetadataValue::try_from(value.as_slice()).unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        let status =
            pb::result_client::ResultClient::new(channel.clone()).get_result(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{auth:?}");
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "UNAUTHENTICATED");
    }

    // grpc-web over HTTP/1.1 with a header that is not UTF-8.
    let frame = grpc_frame(&pb::GetResultRequest { task_id: "x".into(), previews: false }.encode_to_vec());
    let response = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(server.url("/deskgen.v1.Result/GetResult"))
        .header("content-type", "application/grpc-web+proto")
        .header(header::AUTHORIZATION, header::HeaderValue::from_bytes(b"Bearer \xff").unwrap())
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "16", "UNAUTHENTICATED");

    // The right key passes everywhere (so the refusals above are about the keys).
    let response = client
        .post(server.url("/v1/generate"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let mut request = tonic::Request::new(pb::GetResultRequest { task_id: "x".into(), previews: false });
    request.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let status = pb::result_client::ResultClient::new(channel).get_result(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    server.stop().await;
}

fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// A raw gRPC call over HTTP/2 with `body` as the message bytes; returns the status and message.
async fn raw_grpc(server: &TestServer, path: &str, body: Vec<u8>) -> (u32, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = axum::http::Request::post(server.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(grpc_frame(&body))))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let mut fields = response.headers().clone();
    // A trailers-only answer carries the status in its headers, others in the trailers.
    if let Some(trailers) = response.into_body().collect().await.unwrap().trailers() {
        fields.extend(trailers.clone());
    }
    let code = fields["grpc-status"].to_str().unwrap().parse().unwrap();
    let message = fields.get("grpc-message").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (code, message)
}

#[tokio::test]
async fn hostile_grpc_messages_get_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    let mut client = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    let invalid = |status: tonic::Status, case: &str| {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{case}: {status:?}");
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "INVALID_INPUT", "{case}");
    };
    let base = || pb::GenerateRequest { prompt: Some("desk".into()), ..Default::default() };
    let cases: Vec<(&str, pb::GenerateRequest)> = vec![
        ("empty prompt", pb::GenerateRequest { prompt: Some(String::new()), ..Default::default() }),
        ("nothing at all", pb::GenerateRequest::default()),
        ("steps i32::MAX", pb::GenerateRequest { num_inference_steps: Some(i32::MAX), ..base() }),
        ("steps i32::MIN", pb::GenerateRequest { num_inference_steps: Some(i32::MIN), ..base() }),
        ("height negative", pb::GenerateRequest { height: Some(-512), ..base() }),
        ("guidance NaN", pb::GenerateRequest { guidance_scale: Some(f32::NAN), ..base() }),
        ("guidance infinite", pb::GenerateRequest { guidance_scale: Some(f32::INFINITY), ..base() }),
        ("strength NaN", pb::GenerateRequest { strength: Some(f32::NAN), ..base() }),
        ("strength -infinity", pb::GenerateRequest { strength: Some(f32::NEG_INFINITY), ..base() }),
        ("items i32::MIN", pb::GenerateRequest { max_items_per_category: Some(i32::MIN), ..base() }),
        ("NUL in prompt", pb::GenerateRequest { prompt: Some("a\0b".into()), ..base() }),
        ("file URL", pb::GenerateRequest { initial_image_url: Some("file:///etc/shadow".into()), ..base() }),
        (
            "gopher URL",
            pb::GenerateRequest { initial_image_url: Some("gopher://10.0.0.1/".into()), ..base() },
        ),
        ("task id traversal", pb::GenerateRequest { task_id: Some("../../tasks.redb".into()), ..base() }),
        ("empty task id", pb::GenerateRequest { task_id: Some(String::new()), ..base() }),
        (
            "LoRA weight NaN",
            pb::GenerateRequest {
                loras: vec![pb::LoraWeight { name: "x".into(), weight: Some(f32::NAN) }],
                ..base()
            },
        ),
    ];
    for (case, request) in cases {
        invalid(client.generate(request).await.unwrap_err(), case);
    }

    // Over --max-body-bytes (1 MiB by default): refused before it is decoded, with tonic's code.
    let huge = pb::GenerateRequest { prompt: Some("x".repeat(2 << 20)), ..base() };
    let status = client.generate(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    // A string field that is not UTF-8, and bytes that are no protobuf at all: INTERNAL, as tonic
    // (like grpc-go and grpc-java) answers a message that does not decode.
    let not_utf8 = [vec![0x12, 4], b"d\xff\xfee".to_vec()].concat();
    let (code, message) = raw_grpc(&server, "/deskgen.v1.Generate/Generate", not_utf8).await;
    assert_eq!(code, tonic::Code::Internal as u32, "{message}");
    assert!(message.contains("not%20UTF-8"), "{message}");
    let (code, message) = raw_grpc(&server, "/deskgen.v1.Generate/Generate", vec![0xff; 32]).await;
    assert_eq!(code, tonic::Code::Internal as u32, "{message}");

    // The server is still serving after all of it.
    let ok = client.generate(base()).await.unwrap().into_inner();
    assert_eq!(ok.status(), pb::TaskStatus::Queued);
    server.stop().await;
}

#[tokio::test]
async fn webhook_urls_into_private_networks_are_refused_at_submission() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &["--fetch-allow-http"]), ScriptedPipeline::new(1, 1)).await;
    let mut grpc = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    for url in [
        "https://127.0.0.1/hook",
        "http://127.0.0.1:9/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://10.0.0.1/hook",
        "https://192.168.1.1/hook",
        "https://172.16.0.1/hook",
        "https://0.0.0.0/hook",
        "https://2130706433/hook",
        "https://0x7f.1/hook",
        "https://localhost/hook",
        "https://LOCALHOST./hook",
        "https://[fd00:ec2::254]/latest",
    ] {
        let body = json!({"prompt": "d", "webhook_url": url}).to_string();
        let (status, answer) = post_generate(&server, body, Some(KEY)).await;
        Expect::Invalid.check(url, status, &answer);
        assert!(
            answer["message"].as_str().unwrap().contains("webhook_url is not allowed"),
            "{url}: {answer}"
        );
        let status = grpc
            .generate(pb::GenerateRequest {
                prompt: Some("d".into()),
                webhook_url: Some(url.into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{url}");
    }
    server.stop().await;
}

/// The photo host: a server on 127.0.0.2 (the only private address the server under test may
/// reach) with hostile answers, and a live image server on 127.0.0.1 that it must never reach.
async fn hostile_photo_host(loopback: SocketAddr) -> String {
    let jpeg = std::fs::read(common::darknet("dog.jpg")).unwrap();
    let truncated = jpeg[..jpeg.len() / 2].to_vec();
    let png_bomb = png_of_zeros(7_000, 7_000);
    let jpeg_claiming_65500 = jpeg_with_size(&jpeg, 65_500, 65_500);
    let tiny = png_of_zeros(8, 8);
    let redirect = |to: String| get(move || async move { Redirect::temporary(&to) });
    let bytes = |content_type: &'static str, body: Vec<u8>| {
        get(move || async move { ([(header::CONTENT_TYPE, content_type)], body.clone()) })
    };
    let router = axum::Router::new()
        .route("/ok.jpg", bytes("image/jpeg", jpeg.clone()))
        .route("/to-loopback", redirect(format!("http://{loopback}/ok.jpg")))
        .route("/to-localhost", redirect(format!("http://localhost:{}/ok.jpg", loopback.port())))
        .route("/to-v6-loopback", redirect(format!("http://[::1]:{}/ok.jpg", loopback.port())))
        .route("/to-metadata", redirect("http://169.254.169.254/latest/meta-data/iam/".into()))
        .route("/to-private", redirect("http://10.0.0.1/ok.jpg".into()))
        .route("/to-file", redirect("file:///etc/passwd".into()))
        .route("/to-gopher", redirect("gopher://127.0.0.2:70/_x".into()))
        .route("/loop", redirect("/loop".into()))
        .route("/50mb", get(|| async { fifty_megabytes(true) }))
        .route("/50mb-chunked", get(|| async { fifty_megabytes(false) }))
        .route("/bomb.png", bytes("image/png", png_bomb))
        .route("/huge-header.jpg", bytes("image/jpeg", jpeg_claiming_65500))
        .route("/truncated.jpg", bytes("image/jpeg", truncated))
        .route("/tiny.png", bytes("image/png", tiny))
        .route("/page.html", bytes("text/html", b"<html><body>hi</body></html>".to_vec()))
        .route("/html-as-jpeg.jpg", bytes("image/jpeg", b"<html><body>hi</body></html>".to_vec()))
        .route("/empty.png", bytes("image/png", Vec::new()))
        .route(
            "/elf",
            bytes("application/octet-stream", std::fs::read("/proc/self/exe").unwrap()[..4096].to_vec()),
        )
        .route("/missing.jpg", get(|| async { StatusCode::NOT_FOUND }));
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// A JPEG-labelled body of 50 MB, with or without a Content-Length announcing it.
fn fifty_megabytes(announce: bool) -> Response {
    let chunk = bytes::Bytes::from(vec![0u8; 1 << 20]);
    let head = bytes::Bytes::from_static(b"\xff\xd8\xff\xe0");
    let stream = futures::stream::iter(
        std::iter::once(head).chain(std::iter::repeat_n(chunk, 50)).map(Ok::<_, std::io::Error>),
    );
    let mut response = ([(header::CONTENT_TYPE, "image/jpeg")], Body::from_stream(stream)).into_response();
    if announce {
        response.headers_mut().insert(header::CONTENT_LENGTH, (4 + (50 << 20)).to_string().parse().unwrap());
    }
    response
}

/// A grayscale PNG of zeros: `width * height` pixels in a file of a few kilobytes.
fn png_of_zeros(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::GrayImage::new(width, height)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// `jpeg` with its frame header rewritten to claim `width` x `height`.
fn jpeg_with_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof =
        out.windows(2).position(|w| w[0] == 0xff && matches!(w[1], 0xc0 | 0xc2)).expect("a frame header");
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_photos_and_photo_urls_fail_with_their_codes() {
    // A live image server on 127.0.0.1: reaching it would succeed, so only the guard stops it.
    let jpeg = std::fs::read(common::darknet("dog.jpg")).unwrap();
    let loopback_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let loopback = loopback_listener.local_addr().unwrap();
    let live = axum::Router::new()
        .route("/ok.jpg", get(move || async move { ([(header::CONTENT_TYPE, "image/jpeg")], jpeg.clone()) }));
    tokio::spawn(async move { axum::serve(loopback_listener, live).await.unwrap() });
    let host = hostile_photo_host(loopback).await;

    let dir = tempfile::tempdir().unwrap();
    let server = start_real_guarded(dir.path(), &["--fetch-allow", "127.0.0.2", "--fetch-allow-http"]).await;
    let port = loopback.port();
    let cases: Vec<(String, &str)> = vec![
        (format!("http://127.0.0.1:{port}/ok.jpg"), "IMAGE_FETCH_FAILED"),
        (format!("http://localhost:{port}/ok.jpg"), "IMAGE_FETCH_FAILED"),
        (format!("http://[::1]:{port}/ok.jpg"), "IMAGE_FETCH_FAILED"),
        (format!("http://[::ffff:127.0.0.1]:{port}/ok.jpg"), "IMAGE_FETCH_FAILED"),
        (format!("http://2130706433:{port}/ok.jpg"), "IMAGE_FETCH_FAILED"),
        ("https://169.254.169.254/latest/meta-data/".into(), "IMAGE_FETCH_FAILED"),
        ("http://[fd00:ec2::254]/latest/meta-data/".into(), "IMAGE_FETCH_FAILED"),
        ("https://10.0.0.1/desk.jpg".into(), "IMAGE_FETCH_FAILED"),
        ("http://0.0.0.0/desk.jpg".into(), "IMAGE_FETCH_FAILED"),
        ("s3://someone-elses-bucket/desk.jpg".into(), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-loopback"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-localhost"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-v6-loopback"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-metadata"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-private"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-file"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/to-gopher"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/loop"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/missing.jpg"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/50mb"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/50mb-chunked"), "IMAGE_FETCH_FAILED"),
        (format!("{host}/bomb.png"), "INVALID_IMAGE"),
        (format!("{host}/huge-header.jpg"), "INVALID_IMAGE"),
        (format!("{host}/truncated.jpg"), "INVALID_IMAGE"),
        (format!("{host}/tiny.png"), "INVALID_IMAGE"),
        (format!("{host}/page.html"), "INVALID_IMAGE"),
        (format!("{host}/html-as-jpeg.jpg"), "INVALID_IMAGE"),
        (format!("{host}/empty.png"), "INVALID_IMAGE"),
        (format!("{host}/elf"), "INVALID_IMAGE"),
    ];
    let client = reqwest::Client::new();
    let mut submitted = Vec::new();
    for (url, code) in &cases {
        let r = client
            .post(server.url("/v1/generate"))
            .json(&json!({"initial_image_url": url, "num_inference_steps": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{url}");
        let task_id = r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_string();
        submitted.push((url, *code, task_id));
    }
    for (url, code, task_id) in submitted {
        let result = poll_final(&server, &task_id, None).await;
        assert_eq!(result["status"], "failed", "{url}: {result}");
        assert_eq!(result["error_code"], code, "{url}: {result}");
    }

    // The same host serves a real photo, so the failures above are the guard's and the decoder's.
    let r = client
        .post(server.url("/v1/generate"))
        .json(&json!({"initial_image_url": format!("{host}/ok.jpg"), "num_inference_steps": 1}))
        .send()
        .await
        .unwrap();
    let task_id = r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_string();
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    tokio::time::timeout(Duration::from_secs(30), server.stop()).await.expect("stops");
}

/// Sends `head` then `trickle` one byte a second on a raw connection; returns what the server
/// answered before closing it, and how long that took.
async fn trickle(server: &TestServer, head: &[u8], trickle: &[u8]) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    stream.write_all(head).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let bytes = trickle.to_vec();
    let sender = tokio::spawn(async move {
        for byte in bytes {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer)).await;
    sender.abort();
    assert!(read.is_ok(), "the connection was still open after 30 s: {}", String::from_utf8_lossy(&answer));
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

#[tokio::test]
async fn slow_headers_and_trickled_bodies_are_cut_off_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--header-read-timeout", "2s", "--body-read-timeout", "3s"];
    let server = start(serve_config(dir.path(), &flags), ScriptedPipeline::new(1, 1)).await;
    let host = server.addr.to_string();

    // Slowloris: the request line, then one header byte a second, never the blank line.
    let (answer, took) =
        trickle(&server, b"GET /healthcheck HTTP/1.1\r\n", b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaa").await;
    assert!(took < Duration::from_secs(8), "headers cut off after {took:?}");
    assert!(!answer.contains("200 OK"), "{answer}");

    // A grpc-web body starts with its message's length prefix, announcing the 995 bytes that follow.
    for (route, content_type, start) in [
        ("/v1/generate", "application/json", &b""[..]),
        ("/v1/uploads", "image/png", &b""[..]),
        ("/deskgen.v1.Generate/Generate", "application/grpc-web+proto", &[0, 0, 0, 0x03, 0xe3][..]),
    ] {
        let mut head = format!(
            "POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n"
        )
        .into_bytes();
        head.extend_from_slice(start);
        let (answer, took) = trickle(&server, &head, &[b' '; 40]).await;
        assert!(took < Duration::from_secs(10), "{route}: body cut off after {took:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{route}: {answer}");
        assert!(answer.contains("REQUEST_TIMEOUT"), "{route}: {answer}");
    }

    // A prompt body in time is untouched by the deadline.
    let (status, body) = post_generate(&server, r#"{"prompt": "a desk"}"#, None).await;
    assert_eq!(status, 202, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn foreign_pages_rebinding_hosts_and_non_json_bodies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    let client = reqwest::Client::new();
    let generate = server.url("/v1/generate");
    let json_body = r#"{"prompt": "a desk"}"#;
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let allow_origin = response.headers().get("access-control-allow-origin").cloned();
        (status, allow_origin, response.json::<Value>().await.unwrap_or(Value::Null))
    };

    // A page's form or simple fetch: text/plain JSON is not read as a request.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/mixed; boundary=x"] {
        let (status, _, body) =
            send(client.post(&generate).header(header::CONTENT_TYPE, content_type).body(json_body)).await;
        assert_eq!(status, 415, "{content_type}: {body}");
        assert_eq!(body["error_code"], "INVALID_INPUT", "{content_type}: {body}");
    }
    // A body-less cancel stays as it was.
    let (status, _, body) = send(client.post(server.url("/v1/result/none/cancel"))).await;
    assert_eq!(status, 404, "{body}");

    // A foreign Origin may not submit while no API key is configured, nor read answers.
    let foreign = "http://attacker.example";
    let (status, allow, body) = send(
        client
            .post(&generate)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ORIGIN, foreign)
            .body(json_body),
    )
    .await;
    assert_eq!((status, body["error_code"].as_str()), (403, Some("FORBIDDEN")), "{body}");
    assert!(allow.is_none());
    let preflight = client
        .request(reqwest::Method::OPTIONS, &generate)
        .header(header::ORIGIN, foreign)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.headers().get("access-control-allow-origin").is_none(), "{:?}", preflight.headers());
    // The server's own origin (the demo page) may.
    let own = server.base.clone();
    let (status, allow, body) = send(
        client
            .post(&generate)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ORIGIN, &own)
            .body(json_body),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(allow.unwrap(), own.as_str());

    // DNS rebinding: a name that resolves to this loopback server is not one it answers to.
    let rebound = format!("attacker.example:{}", server.addr.port());
    let (status, _, body) = send(client.get(server.url("/info")).header(header::HOST, rebound)).await;
    assert_eq!((status, body["error_code"].as_str()), (403, Some("FORBIDDEN")), "{body}");
    let by_name = format!("localhost:{}", server.addr.port());
    let (status, _, body) = send(client.get(server.url("/info")).header(header::HOST, by_name)).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;

    // `--cors-allow-origin '*'` lets any page in, as before; `--public-host` adds a name.
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--cors-allow-origin", "*", "--public-host", "desk.example.com"];
    let server = start(serve_config(dir.path(), &flags), ScriptedPipeline::new(1, 1)).await;
    let (status, allow, body) = send(
        client
            .post(server.url("/v1/generate"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ORIGIN, foreign)
            .body(json_body),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(allow.unwrap(), "*");
    let (status, _, body) =
        send(client.get(server.url("/info")).header(header::HOST, "desk.example.com")).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}
