//! Photos handed in as bytes: what an upload adds to a generation, and memory under many large
//! uploads at once.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::{Value, json};

use crate::Settings;
use crate::report::{Report, summary, verdict};
use crate::server::{Server, check_assets, repo_path};
use crate::stages::{photo_host, run_task};

/// The default `--max-upload-bytes`.
const LIMIT: usize = 20_000_000;
/// Uploads sent at once in the memory rounds.
const CONCURRENT: usize = 16;

pub async fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    check_assets()?;
    let hosted = photo_host().await?;
    let threads = settings.threads.to_string();
    let mut server = Server::spawn(&[
        "--intra-threads",
        &threads,
        "--fetch-allow",
        "127.0.0.1",
        "--fetch-allow-http",
        "--desk-threshold",
        "0",
    ])?;
    server.wait_ready(Instant::now()).await?;
    let client = reqwest::Client::new();
    let photo = std::fs::read(repo_path("assets/testdata/darknet/dog.jpg"))?;
    let generate = |url: &str| {
        json!({"initial_image_url": url, "prompt": "a tidy desk", "seed": 1,
                                      "num_inference_steps": 4, "height": 128, "width": 128})
    };

    // Alternate the two ways in, so drift in the machine's load falls on both alike.
    run_task(&client, &server.base, &generate(&hosted)).await?;
    let (mut by_url, mut by_upload, mut upload_only) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..settings.runs {
        let started = Instant::now();
        run_task(&client, &server.base, &generate(&hosted)).await?;
        by_url.push(ms(started));

        let started = Instant::now();
        let stored = upload(&client, &server, photo.clone()).await?;
        upload_only.push(ms(started));
        run_task(&client, &server.base, &generate(stored["url"].as_str().unwrap_or_default())).await?;
        by_upload.push(ms(started));
    }
    let (url_ms, upload_ms) = (median(&by_url), median(&by_upload));
    let mut lines = vec![
        format!("URL submit (photo host), to done     median {url_ms:>8.1} ms"),
        format!(
            "POST /v1/uploads, then submit        median {upload_ms:>8.1} ms   ({:+.1} ms)",
            upload_ms - url_ms
        ),
        format!("  of which the upload (201)          median {:>8.1} ms", median(&upload_only)),
        format!(
            "({} runs each, alternating; dog.jpg {} KB, 4 img2img steps at 128x128, file store)",
            settings.runs,
            photo.len() / 1000
        ),
    ];
    let mut doc = json!({
        "url_submit_ms": summary(&by_url),
        "upload_then_submit_ms": summary(&by_upload),
        "upload_ms": summary(&upload_only),
        "added_ms": upload_ms - url_ms,
    });

    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = server.rss_mib()?;
    // Bodies over the limit first: the allocator keeps what the accepted photos used afterwards.
    let big = noise_png(LIMIT - 200_000);
    let mut oversized = big.clone();
    oversized.resize(2 * LIMIT, 0);
    let refused = concurrent_uploads(&client, &server, oversized, 413).await?;
    let accepted = concurrent_uploads(&client, &server, big, 201).await?;
    let bound = idle + (CONCURRENT * LIMIT) as f64 * 2.0 / (1 << 20) as f64;
    lines.push(format!("RSS idle                             {idle:>8.1} MiB"));
    lines.push(format!(
        "RSS peak, {CONCURRENT} x {:.1} MB photos at once  {accepted:>8.1} MiB   (all 201)",
        (LIMIT - 200_000) as f64 / 1e6
    ));
    lines.push(format!(
        "RSS peak, {CONCURRENT} x {:.0} MB bodies at once  {refused:>8.1} MiB   (all 413, cut off at the limit)",
        2.0 * LIMIT as f64 / 1e6
    ));
    lines.push(format!(
        "bound: idle + {CONCURRENT} x 2 x limit (body + pixels) = {bound:.0} MiB   {}",
        verdict(accepted.max(refused) <= bound)
    ));
    doc["rss_idle_mib"] = json!(idle);
    doc["rss_peak_accepted_mib"] = json!(accepted);
    doc["rss_peak_over_limit_mib"] = json!(refused);
    doc["rss_bound_mib"] = json!(bound);
    report.section("uploads", doc, lines);
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn median(samples: &[f64]) -> f64 {
    summary(samples)["median"].as_f64().unwrap_or(f64::NAN)
}

async fn upload(client: &reqwest::Client, server: &Server, body: Vec<u8>) -> anyhow::Result<Value> {
    let response = client.post(server.url("/v1/uploads")).body(body).send().await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    ensure!(status == 201, "upload answered {status}: {answer}");
    Ok(answer)
}

/// Sends `body` to `POST /v1/uploads` from `CONCURRENT` clients at once, checks each answers
/// `status`, and returns the server's peak RSS meanwhile (sampled every 10 ms).
async fn concurrent_uploads(
    client: &reqwest::Client,
    server: &Server,
    body: Vec<u8>,
    status: u16,
) -> anyhow::Result<f64> {
    let body = bytes::Bytes::from(body);
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let request = client.post(server.url("/v1/uploads")).body(body.clone());
        sends.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    }
    let mut peak = server.rss_mib()?;
    while !sends.is_empty() {
        tokio::select! {
            done = sends.join_next() => match done {
                Some(answered) => {
                    let answered = answered?;
                    // A server may close the connection after answering an over-limit body early.
                    match answered {
                        Ok(got) if got != status => bail!("an upload answered {got}, not {status}"),
                        Err(e) if status == 201 => bail!("an upload failed: {e}"),
                        _ => {}
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(10)) => peak = peak.max(server.rss_mib()?),
        }
    }
    Ok(peak.max(server.rss_mib()?))
}

/// A PNG of random pixels about `bytes` long (noise does not compress).
fn noise_png(bytes: usize) -> Vec<u8> {
    let side = ((bytes / 3) as f64).sqrt() as u32;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let pixels = (0..side as usize * side as usize * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let image = image::RgbImage::from_raw(side, side, pixels).unwrap_or_default();
    let mut out = std::io::Cursor::new(Vec::new());
    let _ = image::DynamicImage::ImageRgb8(image).write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}
