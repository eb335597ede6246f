//! Photos handed in as bytes: uploads, inline photos with a generation (JSON, multipart, gRPC),
//! and what is refused before any work.

mod common;

use base64::Engine;
use common::{
    ScriptedPipeline, darknet, gray_png, png, poll_final, post_generate, serve_config, start, wait_ready,
};
use deskgen::api::grpc::pb;
use serde_json::{Value, json};
use tonic_types::StatusExt;

const BOUNDARY: &str = "deskgen-test-boundary";

/// A multipart/form-data body: text fields, then file parts as (name, file name, bytes).
fn form(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .bytes(),
        );
    }
    for (name, file, bytes) in files {
        body.extend(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: image/jpeg\r\n\r\n"
            )
            .bytes(),
        );
        body.extend(*bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{BOUNDARY}--\r\n").bytes());
    body
}

async fn post(server: &common::TestServer, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

#[tokio::test]
async fn an_uploaded_photo_is_stored_and_named_for_a_generation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    wait_ready(&server).await;
    let jpeg = std::fs::read(darknet("dog.jpg")).unwrap();

    // Typed by its bytes: the wrong Content-Type does not matter.
    let (status, raw) = post(&server, "/v1/uploads", "image/png", jpeg.clone()).await;
    assert_eq!(status, 201, "{raw}");
    assert_eq!(raw["content_type"], "image/jpeg");
    assert_eq!(raw["bytes"], jpeg.len());
    assert!(raw["width"].as_u64().unwrap() > 100 && raw["height"].as_u64().unwrap() > 100, "{raw}");
    let key = raw["key"].as_str().unwrap();
    assert!(key.starts_with("images/uploads/") && key.ends_with(".jpg"), "{key}");
    assert_eq!(raw["sha256"].as_str().unwrap().len(), 64);
    let url = raw["url"].as_str().unwrap();
    assert_eq!(url, server.url(&format!("/v1/{key}")), "file-store URLs follow the listen address");
    let stored = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(stored.as_ref(), jpeg.as_slice());

    let (status, multipart) =
        post(&server, "/v1/uploads", &multipart_type(), form(&[], &[("file", "dog.jpg", &jpeg)])).await;
    assert_eq!(status, 201, "{multipart}");
    assert_ne!(multipart["key"], raw["key"]);

    // The upload's URL works as initial_image_url.
    let (status, accepted) =
        post_generate(&server, json!({"initial_image_url": url}).to_string(), None).await;
    assert_eq!(status, 202, "{accepted}");
    let done = poll_final(&server, accepted["task_id"].as_str().unwrap(), None).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["initial_image_url"], url);
    server.stop().await;
}

#[tokio::test]
async fn a_photo_inline_with_a_generation_is_stored_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    wait_ready(&server).await;
    let jpeg = std::fs::read(darknet("dog.jpg")).unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    let count_uploads = || walk(&dir.path().join("images/uploads"));

    for inline in [encoded.clone(), format!("data:image/jpeg;base64,{encoded}")] {
        let body = json!({"initial_image": inline, "prompt": "a tidy desk"}).to_string();
        let (status, accepted) = post_generate(&server, body, None).await;
        assert_eq!(status, 202, "{accepted}");
        let done = poll_final(&server, accepted["task_id"].as_str().unwrap(), None).await;
        let named = done["initial_image_url"].as_str().unwrap();
        assert!(named.starts_with("stored:images/uploads/"), "{done}");
    }
    let fields = [("prompt", "a tidy desk"), ("num_inference_steps", "2")];
    let (status, accepted) =
        post(&server, "/v1/generate", &multipart_type(), form(&fields, &[("image", "dog.jpg", &jpeg)])).await;
    assert_eq!(status, 202, "{accepted}");
    poll_final(&server, accepted["task_id"].as_str().unwrap(), None).await;

    let mut client = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    let request = pb::GenerateRequest { initial_image: Some(jpeg.clone()), ..Default::default() };
    let accepted = client.generate(request).await.unwrap().into_inner();
    let done = poll_final(&server, &accepted.task_id, None).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(count_uploads(), 4);

    // A refused request stores nothing: the photo is kept only once the request is valid.
    let body = json!({"initial_image": encoded, "num_inference_steps": 0}).to_string();
    let (status, refused) = post_generate(&server, body, None).await;
    assert_eq!((status, refused["error_code"].as_str()), (422, Some("INVALID_INPUT")), "{refused}");
    let both =
        json!({"initial_image": encoded, "initial_image_url": "https://example.com/a.jpg"}).to_string();
    assert_eq!(post_generate(&server, both, None).await.0, 422);
    assert_eq!(count_uploads(), 4);
    server.stop().await;
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 })
        .sum()
}

#[tokio::test]
async fn bad_photos_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-upload-bytes", "300000", "--api-key", "k1"];
    let server = start(serve_config(dir.path(), &args), ScriptedPipeline::new(1, 1)).await;
    wait_ready(&server).await;
    let client = reqwest::Client::new();
    let upload = |body: Vec<u8>, content_type: String| {
        let request =
            client.post(server.url("/v1/uploads")).bearer_auth("k1").header("content-type", content_type);
        async move {
            let response = request.body(body).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let mut garbage = png(64, 64)[..40].to_vec();
    garbage.extend(vec![0x5a; 400]);
    // A 30000×30000 PNG header in a small file: refused from the header, nothing decoded.
    let huge = common::png_claiming(30000, 30000);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("empty", Vec::new(), 422, "empty"),
        ("html", b"<!doctype html><p>hi</p>".to_vec(), 422, "HTML"),
        ("svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>".to_vec(), 422, "SVG"),
        ("garbage after a PNG header", garbage, 422, "cannot"),
        ("30000x30000", huge, 422, "pixels"),
        ("over the limit", vec![0xff; 400_000], 413, "limit"),
    ];
    for (case, body, status, says) in cases {
        let (got, answer) = upload(body, "image/png".into()).await;
        assert_eq!(got, status, "{case}: {answer}");
        assert_eq!(answer["error_code"], "INVALID_INPUT", "{case}: {answer}");
        assert!(answer["message"].as_str().unwrap_or_default().contains(says), "{case}: {answer}");
    }
    let photo = png(64, 64);
    let two = form(&[], &[("file", "a.png", &photo), ("file", "b.png", &photo)]);
    assert_eq!(upload(two, multipart_type()).await.0, 422);
    let mut truncated = form(&[], &[("file", "a.png", &photo)]);
    truncated.truncate(truncated.len() / 2);
    let (status, answer) = upload(truncated, multipart_type()).await;
    assert!((400..500).contains(&status), "{status} {answer}");
    let anonymous = client.post(server.url("/v1/uploads")).body(photo).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(walk(&dir.path().join("images/uploads")), 0);

    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info["limits"]["max_upload_bytes"], 300000);
    assert!(info["limits"]["max_image_pixels"].as_u64().unwrap() > 0);
    server.stop().await;
}

/// An inline mask (multipart part, gRPC bytes) is checked and stored like a photo; one that
/// repaints nothing, or is no image, is refused on `mask_image` before anything is stored.
#[tokio::test]
async fn an_inline_mask_is_stored_with_its_photo_or_refused_on_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(1, 1)).await;
    wait_ready(&server).await;
    let jpeg = std::fs::read(darknet("dog.jpg")).unwrap();
    let count_uploads = || walk(&dir.path().join("images/uploads"));
    let (white, black) = (gray_png(64, 48, 255), gray_png(64, 48, 0));

    let files = [("image", "dog.jpg", jpeg.as_slice()), ("mask_image", "mask.png", white.as_slice())];
    let (status, accepted) =
        post(&server, "/v1/generate", &multipart_type(), form(&[("mask_blur", "3")], &files)).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(count_uploads(), 2, "the photo and the mask are stored");

    let files = [("image", "dog.jpg", jpeg.as_slice()), ("mask_image", "mask.png", black.as_slice())];
    let (status, refused) = post(&server, "/v1/generate", &multipart_type(), form(&[], &files)).await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("Nothing to repaint"), "{refused}");

    let mut client = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    let request = |mask: Vec<u8>| pb::GenerateRequest {
        initial_image: Some(jpeg.clone()),
        mask_image: Some(mask),
        preserve_unmasked: Some(true),
        ..Default::default()
    };
    client.generate(request(white.clone())).await.unwrap();
    assert_eq!(count_uploads(), 4);
    for bad in [black.clone(), b"not an image".to_vec(), Vec::new()] {
        let status = client.generate(request(bad)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let violations = status.get_error_details().bad_request().unwrap().field_violations.clone();
        assert_eq!(violations[0].field, "mask_image", "{violations:?}");
    }
    let no_photo =
        pb::GenerateRequest { prompt: Some("a desk".into()), mask_image: Some(white), ..Default::default() };
    let status = client.generate(no_photo).await.unwrap_err();
    assert!(status.message().contains("needs a photo"), "{status:?}");
    assert_eq!(count_uploads(), 4, "refused requests store nothing");
    server.stop().await;
}
