//! The product end to end: the real server, the real vision models, the tiny Stable Diffusion
//! pipeline, the file object store and the sample catalog, on real photos (Debian's darknet images).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestServer, darknet, gray_png, photo_host, poll_final, sse_events, start_real};
use serde_json::{Value, json};

async fn submit(server: &TestServer, body: Value) -> String {
    let r = reqwest::Client::new().post(server.url("/v1/generate")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_string()
}

fn assert_offers(result: &Value, max_items: usize) -> Vec<String> {
    let reserved = [
        "task_id",
        "status",
        "created_at",
        "completed_at",
        "initial_image_url",
        "processed_image_url",
        "processed_image_urls",
        "is_desk",
        "caption",
        "detected_items",
        "detected_text",
        "prompt_used",
        "negative_prompt_used",
        "timings_ms",
        "warnings",
        "seed",
        "control",
        "recommendation_reasons",
    ];
    let mut keys = Vec::new();
    for (key, value) in result.as_object().unwrap() {
        if reserved.contains(&key.as_str()) {
            continue;
        }
        assert!(
            key.chars().any(|c| ('가'..='힣').contains(&c)),
            "category key {key} is not a Korean display name"
        );
        let offers = value.as_array().unwrap();
        assert!(!offers.is_empty() && offers.len() <= max_items, "{key}: {offers:?}");
        for offer in offers {
            let mut fields: Vec<&str> = offer.as_object().unwrap().keys().map(String::as_str).collect();
            fields.sort();
            assert_eq!(fields, ["category3", "category4", "image", "link", "mall", "price", "title"]);
            let price = offer["price"].as_str().unwrap();
            assert!(price.ends_with('원') && price.trim_end_matches('원').parse::<u64>().is_ok(), "{price}");
        }
        let reason = result["recommendation_reasons"][key].as_str().unwrap_or_default();
        assert!(["missing", "upgrade", "asked"].contains(&reason), "{key}: {reason:?}");
        keys.push(key.clone());
    }
    let reasons = result["recommendation_reasons"].as_object().expect("recommendation_reasons");
    assert_eq!(reasons.len(), keys.len(), "one reason per category: {reasons:?}");
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desk_photo_becomes_a_generated_png_with_shopping_lists() {
    let dir = tempfile::tempdir().unwrap();
    let host = photo_host(vec![("desk.jpg", std::fs::read(darknet("dog.jpg")).unwrap())]).await;
    // Any photo counts as a desk at threshold 0: this test is about what happens to a desk.
    let server = start_real(dir.path(), &["--desk-threshold", "0"]).await;
    let task_id = submit(
        &server,
        json!({"initial_image_url": format!("{host}/desk.jpg"), "prompt": "warm wooden tones", "num_inference_steps": 4,
               "seed": 42, "max_items_per_category": 2}),
    )
    .await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    assert_eq!(result["is_desk"], true);
    assert_eq!(result["initial_image_url"], format!("{host}/desk.jpg"));
    let image_url = result["processed_image_url"].as_str().unwrap();
    assert!(image_url.contains("/v1/images/"), "{image_url}");
    let png = reqwest::get(image_url).await.unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let decoded = image::load_from_memory(&png.bytes().await.unwrap()).unwrap();
    // 768×576 keeps its 4:3 at the model's native area (256²), sides multiples of 16.
    assert_eq!((decoded.width(), decoded.height()), (288, 224), "the photo's shape");
    let keys = assert_offers(&result, 2);
    assert_eq!(keys.len(), 3, "max_categories of the built-in settings");
    let prompt = result["prompt_used"].as_str().unwrap();
    assert!(
        prompt.starts_with("a realistic image of")
            && prompt.contains("aesthetically matches and complements")
    );
    assert!(prompt.contains("warm wooden tones"));
    assert!(result["negative_prompt_used"].as_str().unwrap().contains("people, human"));
    assert!(result["detected_items"].as_array().unwrap().iter().any(|d| d["label"] == "dog"));
    for stage in
        ["fetch", "decode", "vision", "text_encode", "unet", "controlnet", "vae", "upload", "shopping"]
    {
        assert!(result["timings_ms"][stage].as_f64().is_some(), "no timing for {stage}: {result}");
    }
    // The model has a canny ControlNet, so the desk keeps its edges by default (config/pipeline.toml).
    assert_eq!(result["control"], json!([{"type": "canny", "scale": 0.8}]), "{result}");

    // Same seed, same inputs: the same image, byte for byte.
    let again = submit(
        &server,
        json!({"initial_image_url": format!("{host}/desk.jpg"), "prompt": "warm wooden tones", "num_inference_steps": 4,
               "seed": 42, "max_items_per_category": 2}),
    )
    .await;
    let again = poll_final(&server, &again, None).await;
    let first = reqwest::get(image_url).await.unwrap().bytes().await.unwrap();
    let second =
        reqwest::get(again["processed_image_url"].as_str().unwrap()).await.unwrap().bytes().await.unwrap();
    assert_eq!(first, second);
    server.stop().await;
}

/// A desk photo with brands printed on it (rendered onto darknet's dog photo for the OCR
/// reference, onnx/ocr_reference.py): the text read comes back in `detected_text`, the caption and
/// prompt name the brands, and shopping searches the brand's accessories first, falling back to
/// the plain query when the branded one finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brands_printed_on_the_desk_reach_the_caption_and_the_shopping_queries() {
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let naver = MockServer::start().await;
    let offer = json!({"title": "제품", "link": "https://smartstore.naver.com/main/products/1", "image": "",
        "lprice": "15000", "hprice": "", "mallName": "", "productId": "1", "productType": "1", "brand": "",
        "maker": "", "category1": "디지털/가전", "category2": "주변기기", "category3": "키보드", "category4": ""});
    let answer = |items: Vec<Value>| {
        ResponseTemplate::new(200)
            .set_body_json(json!({"total": items.len(), "start": 1, "display": items.len(), "items": items}))
    };
    Mock::given(method("GET"))
        .and(path("/v1/search/shop.json"))
        .and(query_param("query", "삼성 27인치 모니터"))
        .respond_with(answer(vec![]))
        .with_priority(1)
        .mount(&naver)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/search/shop.json"))
        .respond_with(answer(vec![offer]))
        .mount(&naver)
        .await;
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures/reference/ocr/dog-logitech.png");
    let host = photo_host(vec![("desk.png", std::fs::read(photo).unwrap())]).await;
    let dir = tempfile::tempdir().unwrap();
    let base_url = naver.uri();
    let flags = ["--desk-threshold", "0", "--shopping-provider", "naver", "--naver-client-id", "id"];
    let server = start_real(
        dir.path(),
        &[&flags[..], &["--naver-client-secret", "secret", "--naver-base-url", &base_url]].concat(),
    )
    .await;
    let task_id = submit(
        &server,
        json!({"initial_image_url": format!("{host}/desk.png"), "prompt": "a new keyboard please",
               "num_inference_steps": 1, "seed": 3}),
    )
    .await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    let text = result["detected_text"].as_array().unwrap();
    let logitech = text.iter().find(|t| t["text"] == "Logitech").unwrap_or_else(|| panic!("{result}"));
    assert_eq!(logitech["brand"], "Logitech");
    assert!(logitech["score"].as_f64().unwrap() > 0.9, "{logitech}");
    // Rendered at (60, 40) to (230, 91) of 768 × 576.
    let b = &logitech["box"];
    let near = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 0.02;
    assert!(near(&b["x_min"], 60.0 / 768.0) && near(&b["y_max"], 87.0 / 576.0), "{b}");
    assert!(result["timings_ms"]["ocr"].as_f64().is_some(), "{result}");
    let caption = result["caption"].as_str().unwrap();
    assert!(caption.contains("Logitech") && caption.contains("Samsung"), "{caption}");
    assert!(result["prompt_used"].as_str().unwrap().contains("the Logitech logo"), "{result}");
    let queries: Vec<String> = naver
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter_map(|r| r.url.query_pairs().find(|(k, _)| k == "query").map(|(_, v)| v.to_string()))
        .collect();
    for query in ["로지텍 기계식 키보드", "로지텍 무선 마우스", "삼성 27인치 모니터", "27인치 모니터"]
    {
        assert!(queries.iter().any(|q| q == query), "no search for {query}: {queries:?}");
    }
    assert_eq!(result["recommendation_reasons"]["키보드"], "asked", "{result}");
    assert_eq!(result["모니터"][0]["price"], "15000원", "the plain query's offers: {result}");
    server.stop().await;
}

/// A 1024×522 desk photo keeps its width: 352×176 by default instead of a 256² centre cut that
/// drops half of it; each resize_mode gives the size it documents, and /info states the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_photo_keeps_its_shape_unless_asked_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let dog = image::open(darknet("dog.jpg")).unwrap();
    let mut wide = std::io::Cursor::new(Vec::new());
    dog.resize_exact(1024, 522, image::imageops::FilterType::Triangle)
        .write_to(&mut wide, image::ImageFormat::Jpeg)
        .unwrap();
    let host = photo_host(vec![("wide.jpg", wide.into_inner())]).await;
    let server = start_real(dir.path(), &["--desk-threshold", "0"]).await;
    let size_of = async |extra: Value| {
        let mut body =
            json!({"initial_image_url": format!("{host}/wide.jpg"), "num_inference_steps": 2, "seed": 1});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let result = poll_final(&server, &submit(&server, body).await, None).await;
        assert_eq!(result["status"], "done", "{result}");
        let png = reqwest::get(result["processed_image_url"].as_str().unwrap()).await.unwrap();
        let decoded = image::load_from_memory(&png.bytes().await.unwrap()).unwrap();
        (decoded.width(), decoded.height())
    };
    assert_eq!(size_of(json!({})).await, (352, 176));
    for mode in ["crop", "fill", "stretch"] {
        assert_eq!(size_of(json!({"resize_mode": mode})).await, (256, 256), "{mode}");
    }
    assert_eq!(size_of(json!({"width": 512})).await, (512, 256), "the other side follows the photo");
    assert_eq!(size_of(json!({"resize_mode": "crop", "width": 128, "height": 64})).await, (128, 64));

    let client = reqwest::Client::new();
    let refused = client
        .post(format!("{}/v1/generate", server.base))
        .json(&json!({"initial_image_url": format!("{host}/wide.jpg"), "resize_mode": "zoom"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let message = refused.json::<Value>().await.unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.contains("resize_mode must be one of fit, crop, fill, stretch"), "{message}");
    let info: Value = client.get(format!("{}/info", server.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["defaults"]["resize_mode"], "fit");
    assert_eq!(info["resize_modes"], json!(["fit", "crop", "fill", "stretch"]));
    assert_eq!(info["limits"]["size_multiple"], 16);
    assert!(info["size_rule"].as_str().unwrap().contains("aspect"), "{info}");
    server.stop().await;
}

/// Desk photos get the configured canny control by default; a request may turn it off, bring its
/// own control image for another ControlNet, and is told which control types exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_follows_the_request_and_the_desk_default() {
    let dir = tempfile::tempdir().unwrap();
    let edges = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures/reference/controlnet/control_softedge.png"),
    )
    .unwrap();
    let desk = std::fs::read(darknet("dog.jpg")).unwrap();
    let host = photo_host(vec![("desk.jpg", desk), ("edges.png", edges)]).await;
    let server = start_real(dir.path(), &["--desk-threshold", "0"]).await;
    let photo = format!("{host}/desk.jpg");
    let run = async |extra: Value| {
        let mut body = json!({"initial_image_url": photo, "num_inference_steps": 2, "seed": 3});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let result = poll_final(&server, &submit(&server, body).await, None).await;
        assert_eq!(result["status"], "done", "{result}");
        let png = reqwest::get(result["processed_image_url"].as_str().unwrap()).await.unwrap();
        (result, png.bytes().await.unwrap())
    };
    let (default, default_png) = run(json!({})).await;
    assert_eq!(default["control"], json!([{"type": "canny", "scale": 0.8}]));
    let (off, off_png) = run(json!({"control": []})).await;
    assert_eq!(off["control"], json!([]));
    assert!(off["timings_ms"].get("controlnet").is_none(), "{off}");
    assert_ne!(default_png, off_png, "the control changes the image");
    let own = json!({"control": [
        {"type": "softedge", "scale": 0.5, "guidance_end": 0.5, "image_url": format!("{host}/edges.png")},
        {"type": "canny", "low_threshold": 50, "high_threshold": 150}
    ]});
    let (both, _) = run(own).await;
    assert_eq!(both["control"], json!([{"type": "softedge", "scale": 0.5}, {"type": "canny", "scale": 1.0}]));
    // HED makes the soft edges from the photo itself.
    let (soft, soft_png) = run(json!({"control": [{"type": "softedge"}]})).await;
    assert_eq!(soft["control"], json!([{"type": "softedge", "scale": 1.0}]));
    assert_ne!(soft_png, default_png);
    let body = json!({"initial_image_url": photo, "control": [
        {"type": "softedge", "image_url": format!("{host}/none.png")}]});
    let missing = poll_final(&server, &submit(&server, body).await, None).await;
    assert_eq!(missing["error_code"], "IMAGE_FETCH_FAILED", "{missing}");

    let client = reqwest::Client::new();
    let refused = client
        .post(format!("{}/v1/generate", server.base))
        .json(&json!({"initial_image_url": photo, "control": [{"type": "depth"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let message = refused.json::<Value>().await.unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.contains("Unknown control type 'depth'; known: canny, softedge"), "{message}");
    let info: Value = client.get(format!("{}/info", server.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        info["controlnets"],
        json!([{"type": "canny", "from_photo": true}, {"type": "softedge", "from_photo": true}])
    );
    assert_eq!(info["default_control"]["type"], "canny");
    assert_eq!(info["default_control"]["strength"], 0.9);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_that_is_not_a_desk_falls_back_to_shopping() {
    let dir = tempfile::tempdir().unwrap();
    let host = photo_host(vec![("horses.jpg", std::fs::read(darknet("horses.jpg")).unwrap())]).await;
    let server = start_real(dir.path(), &[]).await;
    let task_id = submit(&server, json!({"initial_image_url": format!("{host}/horses.jpg")})).await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    assert_eq!(result["is_desk"], false);
    assert_eq!(result["processed_image_url"], Value::Null);
    assert!(result["warnings"][0].as_str().unwrap().contains("does not look like a desk"));
    assert!(!assert_offers(&result, 3).is_empty(), "shopping lists still come back");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_alone_is_text_to_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_real(dir.path(), &[]).await;
    let task_id = submit(
        &server,
        json!({"prompt": "minimal wooden desk setup with a plant", "num_inference_steps": 3, "width": 128, "height": 64}),
    )
    .await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    assert!(result.get("is_desk").is_none());
    assert_eq!(result["control"], json!([]), "no photo, no default control");
    let png =
        reqwest::get(result["processed_image_url"].as_str().unwrap()).await.unwrap().bytes().await.unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (128, 64));
    assert!(assert_offers(&result, 3).contains(&"화분".to_string()), "the category the prompt names");
    assert!(result["prompt_used"].as_str().unwrap().contains("a small potted plant"));
    server.stop().await;
}

/// The PNGs of a finished task, in order.
async fn images_of(result: &Value) -> Vec<image::RgbImage> {
    let mut images = Vec::new();
    for url in result["processed_image_urls"].as_array().unwrap_or_else(|| panic!("no images: {result}")) {
        let png = reqwest::get(url.as_str().unwrap()).await.unwrap().bytes().await.unwrap();
        images.push(image::load_from_memory(&png).unwrap().to_rgb8());
    }
    images
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_images_are_each_what_their_seed_draws_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_real(dir.path(), &[]).await;
    let body = |seed: u64, num_images: u32| {
        json!({"prompt": "a desk with a lamp", "num_inference_steps": 3, "width": 64, "height": 64,
               "seed": seed, "num_images": num_images})
    };
    let three = poll_final(&server, &submit(&server, body(41, 3)).await, None).await;
    assert_eq!(three["status"], "done", "{three}");
    assert_eq!(three["seed"], 41);
    let urls = three["processed_image_urls"].as_array().unwrap();
    assert_eq!(urls.len(), 3, "{three}");
    assert_eq!(three["processed_image_url"], urls[0], "the first image keeps the single-image field");
    let batch = images_of(&three).await;
    assert!(max_pixel_diff(&batch[0], &batch[1]) > 0 && max_pixel_diff(&batch[1], &batch[2]) > 0);

    for (index, seed) in [(0, 41), (1, 42)] {
        let alone = poll_final(&server, &submit(&server, body(seed, 1)).await, None).await;
        assert_eq!(alone["processed_image_urls"].as_array().unwrap().len(), 1, "{alone}");
        assert_eq!(
            max_pixel_diff(&batch[index], &image_of(&alone).await),
            0,
            "image {} vs seed {seed}",
            index + 1
        );
    }

    let too_many =
        reqwest::Client::new().post(server.url("/v1/generate")).json(&body(1, 5)).send().await.unwrap();
    assert_eq!(too_many.status(), 422);
    let problem = too_many.json::<Value>().await.unwrap();
    assert!(problem.to_string().contains("num_images"), "{problem}");
    server.stop().await;
}

/// `deskgen_previews_total` in /metrics: previews the pipeline made.
async fn previews_made(server: &TestServer) -> u64 {
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("deskgen_previews_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn decode_jpeg(bytes: &[u8]) -> image::RgbImage {
    assert_eq!(image::guess_format(bytes).unwrap(), image::ImageFormat::Jpeg);
    image::load_from_memory(bytes).unwrap().to_rgb8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_who_ask_get_previews_and_nobody_else_costs_any() {
    use deskgen::api::grpc::pb;
    let dir = tempfile::tempdir().unwrap();
    let server = start_real(dir.path(), &[]).await;
    let body = |steps: u32| {
        json!({"prompt": "a desk with a lamp", "num_inference_steps": steps, "width": 320, "height": 192,
               "seed": 3, "preview_every": 3})
    };

    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info["sd_models"][0]["previews"], "linear");

    // Nobody watches: no preview is made.
    let alone = poll_final(&server, &submit(&server, body(12)).await, None).await;
    assert_eq!(alone["status"], "done", "{alone}");
    assert_eq!(previews_made(&server).await, 0, "no watcher, no preview");

    // The one worker is busy with a first task while the streams on the second open.
    let blocker = submit(&server, body(30)).await;
    let watched = submit(&server, body(12)).await;
    let (with_path, without_path) =
        (format!("/v1/result/{watched}/events?previews=true"), format!("/v1/result/{watched}/events"));
    let (with, without) = tokio::join!(sse_events(&server, &with_path), sse_events(&server, &without_path));
    let (steps, linear): (Vec<u64>, Vec<image::RgbImage>) = sse_pictures(&with).into_iter().unzip();
    assert_eq!(with.last().unwrap().1["status"], "done");
    assert!(with.last().unwrap().1.get("progress").is_none(), "no preview in the result");
    assert_eq!(steps, [3, 6, 9, 12], "every preview, at the stated steps");
    assert!(without.iter().all(|(_, e)| e["progress"].get("preview").is_none()), "a stream that did not ask");
    let result = reqwest::get(server.url(&format!("/v1/result/{watched}"))).await.unwrap();
    assert!(!result.text().await.unwrap().contains("preview"), "nor a poller");
    assert_eq!(poll_final(&server, &blocker, None).await["status"], "done");
    let made = previews_made(&server).await;
    assert_eq!(made, 4, "steps 3, 6, 9 and 12 of the watched task only");

    // gRPC: WatchResult with previews set gets Progress.preview JPEGs, made after every third step.
    let blocker = submit(&server, body(30)).await;
    let watched = submit(&server, body(6)).await;
    let channel = server.grpc_channel().await;
    let mut results = pb::result_client::ResultClient::new(channel);
    let request = pb::GetResultRequest { task_id: watched.clone(), previews: true };
    let mut stream = results.watch_result(request).await.unwrap().into_inner();
    let mut grpc_steps = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(progress) = message.progress.filter(|p| !p.preview.is_empty()) {
            assert_eq!(decode_jpeg(&progress.preview).dimensions(), (160, 96));
            grpc_steps.push(progress.step);
        }
    }
    assert_eq!(grpc_steps, [3, 6], "every preview, at the stated steps");
    assert_eq!(poll_final(&server, &blocker, None).await["status"], "done");
    assert_eq!(previews_made(&server).await, made + 2);
    server.stop().await;

    // With a tiny decoder, the same steps are drawn by it: other pictures, same sizes and steps.
    let decoder = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures/tiny-taesd");
    let server = start_real(dir.path(), &["--preview-decoder", decoder.to_str().unwrap()]).await;
    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info["sd_models"][0]["previews"], "decoder");
    let blocker = submit(&server, body(30)).await;
    let watched = submit(&server, body(12)).await;
    let events = sse_events(&server, &format!("/v1/result/{watched}/events?previews=true")).await;
    let (steps, decoded): (Vec<u64>, Vec<image::RgbImage>) = sse_pictures(&events).into_iter().unzip();
    assert_eq!(steps, [3, 6, 9, 12]);
    for (linear, decoded) in linear.iter().zip(&decoded) {
        assert!(max_pixel_diff(linear, decoded) > 16, "the decoder's picture, not the linear map's");
    }
    assert_eq!(poll_final(&server, &blocker, None).await["status"], "done");
    server.stop().await;
}

/// The previews of SSE events as (step, picture), each checked to be a 160x96 JPEG (half the
/// 320x192 image) in a `progress` event.
fn sse_pictures(events: &[(String, Value)]) -> Vec<(u64, image::RgbImage)> {
    use base64::Engine;
    let mut pictures = Vec::new();
    for (name, event) in events {
        let Some(url) = event["progress"]["preview"].as_str() else { continue };
        assert_eq!(name, "progress");
        let jpeg = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/jpeg;base64,").unwrap())
            .unwrap();
        let picture = decode_jpeg(&jpeg);
        assert_eq!(picture.dimensions(), (160, 96), "half the 320x192 image");
        pictures.push((event["progress"]["step"].as_u64().unwrap(), picture));
    }
    pictures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_photos_fail_with_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let host = photo_host(vec![("text.jpg", b"this is not an image at all".to_vec())]).await;
    let server = start_real(dir.path(), &[]).await;
    let not_image = submit(&server, json!({"initial_image_url": format!("{host}/text.jpg")})).await;
    let missing = submit(&server, json!({"initial_image_url": format!("{host}/missing.jpg")})).await;
    let result = poll_final(&server, &not_image, None).await;
    assert_eq!(
        (result["status"].as_str(), result["error_code"].as_str()),
        (Some("failed"), Some("INVALID_IMAGE"))
    );
    let result = poll_final(&server, &missing, None).await;
    assert_eq!(result["error_code"], "IMAGE_FETCH_FAILED", "{result}");
    assert!(result["message"].as_str().unwrap().contains("404"), "{result}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_store_fails_the_task_with_s3_upload_failed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_real(dir.path(), &[]).await;
    // The image folder becomes a file: every write under it fails.
    let images = dir.path().join("images");
    std::fs::remove_dir_all(&images).ok();
    std::fs::write(&images, b"not a folder").unwrap();
    let task_id = submit(&server, json!({"prompt": "desk", "num_inference_steps": 2})).await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(
        (result["status"].as_str(), result["error_code"].as_str(), result["message"].as_str()),
        (Some("failed"), Some("S3_UPLOAD_FAILED"), Some("Failed to upload image to S3.")),
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_failure_falls_back_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    // A pipeline whose UNet is SDXL's: it loads, but fails on its first step (it wants more inputs).
    let model = dir.path().join("broken-sd");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures");
    copy_dir(&fixtures.join("tiny-sd15"), &model);
    std::fs::copy(fixtures.join("tiny-sdxl/unet/model.onnx"), model.join("unet/model.onnx")).unwrap();
    let server = start_real(dir.path(), &["--sd-model", model.to_str().unwrap()]).await;
    let task_id = submit(&server, json!({"prompt": "a desk with a lamp", "num_inference_steps": 2})).await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    assert_eq!(result["processed_image_url"], Value::Null);
    assert!(result["warnings"][0].as_str().unwrap().starts_with("Image generation failed"), "{result}");
    assert!(assert_offers(&result, 3).contains(&"데스크 조명".to_string()));
    server.stop().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A few-step model's `deskgen-defaults.json` is what a request that sets nothing gets, and what
/// /info reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_s_own_defaults_fill_a_bare_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("turbo-sd");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures/tiny-sd15"), &model);
    let defaults = json!({"num_inference_steps": 2, "guidance_scale": 0.0, "scheduler": "lcm", "size": 128});
    std::fs::write(model.join("deskgen-defaults.json"), defaults.to_string()).unwrap();
    let server = start_real(dir.path(), &["--sd-model", model.to_str().unwrap()]).await;
    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    let shown = &info["defaults"];
    assert_eq!(
        [&shown["num_inference_steps"], &shown["guidance_scale"], &shown["scheduler"], &shown["width"]],
        [&json!(2), &json!(0.0), &json!("lcm"), &json!(128)],
        "{info}"
    );
    let task_id = submit(&server, json!({"prompt": "a desk with a lamp"})).await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    let png =
        reqwest::get(result["processed_image_url"].as_str().unwrap()).await.unwrap().bytes().await.unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (128, 128));
    assert_eq!(info["limits"]["scheduler_max_steps"], json!({"lcm": 50}), "{info}");
    let refused = reqwest::Client::new()
        .post(server.url("/v1/generate"))
        .json(&json!({"prompt": "a desk", "num_inference_steps": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422, "the model's default scheduler, lcm, runs at most 50 steps");
    let body: Value = refused.json().await.unwrap();
    assert!(body.to_string().contains("at most 50 with the lcm scheduler"), "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_diffusion_within_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_real(dir.path(), &[]).await;
    let task_id =
        submit(&server, json!({"prompt": "desk", "num_inference_steps": 150, "width": 512, "height": 512}))
            .await;
    let client = reqwest::Client::new();
    let mut step = 0;
    for _ in 0..400 {
        let r: Value = client
            .get(server.url(&format!("/v1/result/{task_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if r["progress"]["stage"] == "diffusion" && r["progress"]["step"].as_u64().unwrap_or(0) >= 1 {
            step = r["progress"]["step"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(step >= 1, "diffusion never started");
    let canceled: Value = client
        .post(server.url(&format!("/v1/result/{task_id}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(canceled["status"], "canceled", "{canceled}");
    assert_eq!(canceled["error_code"], "CANCELED");
    server.stop().await;
}

/// `NAME=DIR` of `--sd-model` for a committed fixture.
fn fixture_model(name: &str, fixture: &str) -> String {
    format!("{name}={}", Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures").join(fixture).display())
}

/// The generated image of a finished task.
async fn image_of(result: &Value) -> image::RgbImage {
    let url = result["processed_image_url"].as_str().unwrap_or_else(|| panic!("no image: {result}"));
    let png = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    image::load_from_memory(&png).unwrap().to_rgb8()
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// What the engine itself draws on `fixture` for the prompts, seed and defaults a task reported.
fn drawn_directly(fixture: &str, result: &Value, scheduler: &str) -> image::RgbImage {
    use deskgen::inference::diffusion::{GenerateParams, StableDiffusion};
    use deskgen::inference::{Runtime, RuntimeConfig};
    let runtime = Runtime::init(&RuntimeConfig { intra_threads: 1, ..RuntimeConfig::default() }).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures").join(fixture);
    let mut sd = StableDiffusion::load(&runtime, dir).unwrap();
    let params = GenerateParams {
        prompt: result["prompt_used"].as_str().unwrap().into(),
        negative_prompt: result["negative_prompt_used"].as_str().unwrap().into(),
        num_inference_steps: 3,
        guidance_scale: 7.5,
        width: 64,
        height: 64,
        strength: 0.75,
        seed: result["seed"].as_u64().unwrap(),
        scheduler: scheduler.parse().unwrap(),
        init_image: None,
        guidance_rescale: 0.0,
        loras: vec![],
        control: vec![],
        mask: None,
    };
    sd.generate(&params, &mut |_| std::ops::ControlFlow::Continue(())).unwrap().image
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Which models /info says are in memory.
async fn loaded_models(server: &TestServer) -> Vec<String> {
    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    let models = info["sd_models"].as_array().unwrap().iter();
    models.filter(|m| m["loaded"] == true).map(|m| m["name"].as_str().unwrap().to_string()).collect()
}

/// Serves models sd and xl with `--max-loaded-models max`; checks /info and the refusal of an
/// unknown model (REST) and GetInfo's list; draws with xl, sd, xl (over gRPC) and no model named,
/// one after the other; prints which
/// models /info had in memory at the start and after each draw, and the process's RSS; then checks
/// each image against what the engine draws on that model directly.
async fn serve_two_models(max: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (sd, xl) = (fixture_model("sd", "tiny-sd15"), fixture_model("xl", "tiny-sdxl"));
    let args = ["--sd-model", &sd, "--sd-model", &xl, "--max-loaded-models", max];
    let server = start_real(dir.path(), &args).await;
    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    let listed: Vec<(&str, &str)> = (info["sd_models"].as_array().unwrap().iter())
        .map(|m| (m["name"].as_str().unwrap(), m["variant"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("sd", "sd"), ("xl", "sdxl")], "{info}");
    assert_eq!(
        info["defaults"]["scheduler"], info["sd_models"][0]["defaults"]["scheduler"],
        "top level: the default model"
    );
    let refused = reqwest::Client::new()
        .post(server.url("/v1/generate"))
        .json(&json!({"prompt": "a desk", "model": "turbo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert!(body.to_string().contains("Unknown model 'turbo'; choose one of: sd, xl."), "{body}");
    use deskgen::api::grpc::pb;
    let channel = server.grpc_channel().await;
    let grpc =
        pb::info_client::InfoClient::new(channel.clone()).get_info(pb::GetInfoRequest {}).await.unwrap();
    let listed: Vec<(String, String, bool)> =
        grpc.into_inner().sd_models.into_iter().map(|m| (m.name, m.variant, m.loaded)).collect();
    let xl_loaded = max != "1";
    assert_eq!(listed, [("sd".into(), "sd".into(), true), ("xl".into(), "sdxl".into(), xl_loaded)]);

    let mut seen = vec![loaded_models(&server).await];
    let mut results = Vec::new();
    for (model, by_grpc) in [(Some("xl"), false), (Some("sd"), false), (Some("xl"), true), (None, false)] {
        let task_id = if by_grpc {
            let request = pb::GenerateRequest {
                prompt: Some("a desk with a lamp".into()),
                model: model.map(str::to_string),
                num_inference_steps: Some(3),
                seed: Some(7),
                width: Some(64),
                height: Some(64),
                ..Default::default()
            };
            let mut client = pb::generate_client::GenerateClient::new(channel.clone());
            client.generate(request).await.unwrap().into_inner().task_id
        } else {
            let mut body = json!({"prompt": "a desk with a lamp", "num_inference_steps": 3, "seed": 7, "width": 64, "height": 64});
            if let Some(model) = model {
                body["model"] = json!(model);
            }
            submit(&server, body).await
        };
        let result = poll_final(&server, &task_id, None).await;
        assert_eq!(result["status"], "done", "{result}");
        results.push((image_of(&result).await, result));
        seen.push(loaded_models(&server).await);
    }
    println!("loaded={}", serde_json::to_string(&seen).unwrap());
    println!("rss_kib={}", vm_rss_kib());
    server.stop().await;

    let scheduler = |i: usize| info["sd_models"][i]["defaults"]["scheduler"].as_str().unwrap().to_string();
    let [(xl_image, xl_result), (sd_image, sd_result), (xl_again, _), (default_image, _)] = &results[..]
    else {
        unreachable!()
    };
    assert_eq!(max_pixel_diff(xl_image, &drawn_directly("tiny-sdxl", xl_result, &scheduler(1))), 0);
    assert_eq!(max_pixel_diff(sd_image, &drawn_directly("tiny-sd15", sd_result, &scheduler(0))), 0);
    assert_eq!(xl_image, xl_again, "xl draws the same after a reload");
    assert_eq!(sd_image, default_image, "no model named: the first one");
    let apart = max_pixel_diff(sd_image, xl_image);
    assert!(apart > 64, "the two models drew nearly the same image (max difference {apart})");
}

/// Two models in one server: a request gets the image its model makes (what the engine draws on
/// that model directly), one that names none gets the first model's, and an unknown name is
/// refused with the known ones. With `--max-loaded-models 1` the other model is unloaded and
/// loaded again on demand: /info shows one model in memory at a time, and the process holds less
/// than with both loaded. RSS is per process, so each server runs in a process of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_side_by_side_or_one_at_a_time() {
    const CHILD: &str = "DESKGEN_TEST_MAX_LOADED_MODELS";
    if let Ok(max) = std::env::var(CHILD) {
        return serve_two_models(&max).await;
    }
    // Both children at once: each one's RSS is its own.
    let spawn = |max: &str| {
        let name = "two_models_side_by_side_or_one_at_a_time";
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, max)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let report = |child: std::process::Child| {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        let value = |key: &str| {
            let line =
                stdout.lines().find_map(|l| Some(l.split_once(key)?.1)).unwrap_or_else(|| panic!("{stdout}"));
            line.to_string()
        };
        let loaded: Vec<Vec<String>> = serde_json::from_str(&value("loaded=")).unwrap();
        (loaded, value("rss_kib=").parse::<u64>().unwrap())
    };
    let (limited, unlimited) = (spawn("1"), spawn("0"));
    let (one, rss_one) = report(limited);
    assert_eq!(one, [["sd"], ["xl"], ["sd"], ["xl"], ["sd"]]);
    let (all, rss_all) = report(unlimited);
    assert!(all.iter().all(|loaded| loaded == &["sd", "xl"]), "{all:?}");
    println!(
        "RSS after the same four draws: {rss_one} KiB with one model in memory, {rss_all} KiB with both"
    );
    // tiny-sdxl's sessions hold about 50 MiB; a model that was never let go would leave no gap.
    assert!(rss_all > rss_one + 16 * 1024, "one model in memory: {rss_one} KiB, both: {rss_all} KiB");
}

async fn png_of(url: &str) -> image::DynamicImage {
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    image::load_from_memory(&bytes).unwrap()
}

/// `keep` with `preserve_unmasked`: the kept item's pixels come back as the photo's (after the
/// same resize), the mask is stored beside the image, and names the detector did not see warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_item_stays_as_it_was_and_the_mask_comes_back() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let dog = std::fs::read(darknet("dog.jpg")).unwrap();
    let host = photo_host(vec![
        ("desk.jpg", dog.clone()),
        ("black.png", gray_png(40, 32, 0)),
        ("text.png", b"no image here".to_vec()),
    ])
    .await;
    let server = start_real(dir.path(), &["--desk-threshold", "0"]).await;
    let photo = format!("{host}/desk.jpg");
    let task_id = submit(
        &server,
        json!({"initial_image_url": photo, "keep": ["dog", "lamp"], "preserve_unmasked": true,
               "num_inference_steps": 4, "seed": 3}),
    )
    .await;
    let result = poll_final(&server, &task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    let warnings: Vec<&str> =
        result["warnings"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(warnings.iter().any(|w| w.contains("no lamp was detected")), "{warnings:?}");
    assert!(result["control"].as_array().unwrap().is_empty(), "a mask takes no default control: {result}");
    let image = png_of(result["processed_image_url"].as_str().unwrap()).await.to_rgb8();
    let mask_url = result["mask_url"].as_str().expect("mask_url");
    assert!(mask_url.ends_with("-mask.png"), "{mask_url}");
    let mask = png_of(mask_url).await.to_luma8();
    assert_eq!(mask.dimensions(), image.dimensions());
    let decoded = deskgen::inference::vision::decode_image(&dog, u64::MAX).unwrap();
    let (width, height) = image.dimensions();
    let shaped =
        deskgen::pipeline::shape::shape_photo(&decoded, deskgen::core::ResizeMode::Fit, width, height);
    let dog_box =
        &result["detected_items"].as_array().unwrap().iter().find(|d| d["label"] == "dog").unwrap()["box"];
    let centre = |lo: &str, hi: &str, side: u32| {
        ((dog_box[lo].as_f64().unwrap() + dog_box[hi].as_f64().unwrap()) / 2.0 * f64::from(side)) as u32
    };
    let (cx, cy) = (centre("x_min", "x_max", width), centre("y_min", "y_max", height));
    assert_eq!(mask.get_pixel(cx, cy)[0], 0, "the dog's box is kept");
    let kept: Vec<(u32, u32)> =
        mask.enumerate_pixels().filter(|(_, _, m)| m[0] == 0).map(|(x, y, _)| (x, y)).collect();
    assert!(kept.len() > 1000, "{} pixels kept", kept.len());
    for (x, y) in kept {
        assert_eq!(image.get_pixel(x, y), shaped.get_pixel(x, y), "({x}, {y}) is the photo's pixel");
    }
    let repainted = mask
        .enumerate_pixels()
        .filter(|(x, y, m)| m[0] == 255 && image.get_pixel(*x, *y) != shaped.get_pixel(*x, *y))
        .count();
    assert!(repainted > 1000, "the rest is repainted ({repainted})");

    // Masks that cannot be used: inline ones are refused at once, the others fail their task.
    let post = |body: Value| {
        let url = server.url("/v1/generate");
        async move {
            let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let black = base64::engine::general_purpose::STANDARD.encode(gray_png(32, 32, 0));
    let (status, body) = post(json!({"initial_image_url": photo, "mask_image": black})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("Nothing to repaint"), "{body}");
    let (status, body) = post(json!({"initial_image_url": photo, "mask_image": "aGVsbG8="})).await;
    assert_eq!((status, body["error_code"].as_str()), (422, Some("INVALID_INPUT")), "{body}");
    assert!(body["message"].as_str().unwrap().starts_with("The mask cannot be used"), "{body}");
    let (status, body) = post(json!({"prompt": "a desk", "keep": ["dog"]})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("needs a photo"), "{body}");

    let failed = |body: Value| {
        let server = &server;
        async move { poll_final(server, &submit(server, body).await, None).await }
    };
    let steps = 2;
    let result = failed(json!({"initial_image_url": photo, "mask_image_url": format!("{host}/black.png"), "num_inference_steps": steps})).await;
    assert_eq!(
        (result["status"].as_str(), result["error_code"].as_str()),
        (Some("failed"), Some("INVALID_INPUT")),
        "{result}"
    );
    assert!(result["message"].as_str().unwrap().contains("Nothing to repaint"), "{result}");
    let result = failed(json!({"initial_image_url": photo, "mask_image_url": format!("{host}/text.png"), "num_inference_steps": steps})).await;
    assert_eq!(result["error_code"], "INVALID_IMAGE", "{result}");
    assert!(result["message"].as_str().unwrap().starts_with("mask_image_url"), "{result}");
    let result =
        failed(json!({"initial_image_url": photo, "repaint": ["lamp"], "num_inference_steps": steps})).await;
    assert_eq!(result["error_code"], "INVALID_INPUT", "{result}");
    assert!(result["message"].as_str().unwrap().starts_with("repaint: Nothing to repaint"), "{result}");
    server.stop().await;
}

/// A 9-channel inpainting model as the only model: /info says so, and it serves masked requests,
/// photos without a mask and text alone (as masks that repaint everything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inpainting_model_serves_masked_and_plain_requests() {
    let dir = tempfile::tempdir().unwrap();
    let host = photo_host(vec![("desk.jpg", std::fs::read(darknet("dog.jpg")).unwrap())]).await;
    let model = fixture_model("inpaint", "tiny-sd15-inpaint");
    let server = start_real(dir.path(), &["--desk-threshold", "0", "--sd-model", &model]).await;
    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info["sd_models"][0]["inpainting"], true, "{info}");
    let photo = format!("{host}/desk.jpg");
    for body in [
        json!({"initial_image_url": photo, "repaint": ["dog"], "num_inference_steps": 3, "seed": 1}),
        json!({"initial_image_url": photo, "num_inference_steps": 3, "seed": 1}),
        json!({"prompt": "a tidy desk", "num_inference_steps": 3, "seed": 1}),
    ] {
        let result = poll_final(&server, &submit(&server, body.clone()).await, None).await;
        assert_eq!(result["status"], "done", "{body}: {result}");
        assert!(result["processed_image_url"].is_string(), "{body}: {result}");
        assert_eq!(result["mask_url"].is_string(), body.get("repaint").is_some(), "{result}");
    }
    server.stop().await;
}
