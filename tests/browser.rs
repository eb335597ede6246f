//! The demo page at `/`: served by the binary, and used for real in Debian's Chromium (driven by
//! playwright-core through web/tests/demo.mjs) against the server on 127.0.0.1:0.
//!
//! Needs Node.js 20 and `/usr/bin/chromium` (`apt-get install -y chromium`); web/node_modules is
//! installed with `npm ci` when missing or older than web/package-lock.json.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{ScriptedPipeline, TestServer, darknet, photo_host, serve_config, start, start_real};
use image::{ImageFormat, Rgb, RgbImage};

const CHROMIUM: &str = "/usr/bin/chromium";

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `npm ci` in web/ unless node_modules is at least as new as the lock file. A file lock keeps
/// test processes run in parallel (nextest) from installing over each other.
fn install_node_modules() {
    let lock_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-npm-ci.lock");
    let lock = std::fs::File::create(&lock_path).expect("lock file");
    lock.lock().expect("lock web/node_modules");
    let web = web_dir();
    let installed = modified(&web.join("node_modules/.package-lock.json"));
    if installed.is_some() && installed >= modified(&web.join("package-lock.json")) {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(&web)
        .status()
        .expect("npm (Node.js 20) is needed for the browser tests");
    assert!(status.success(), "npm ci in web/ failed");
}

/// Plain pictures standing in for the photo, the generated image and a product image, which the
/// scripted pipeline's results point at on example.invalid.
fn write_example_images(dir: &Path) {
    let picture = |top: [u8; 3], bottom: [u8; 3], block: [u8; 3]| {
        RgbImage::from_fn(320, 240, |x, y| {
            if (100..220).contains(&x) && (120..170).contains(&y) {
                return Rgb(block);
            }
            let t = y as f32 / 240.0;
            Rgb(std::array::from_fn(|c| (top[c] as f32 * (1.0 - t) + bottom[c] as f32 * t) as u8))
        })
    };
    picture([200, 200, 195], [120, 90, 60], [40, 40, 45]).save(dir.join("original.png")).unwrap();
    picture([235, 230, 220], [150, 110, 70], [30, 60, 110]).save(dir.join("generated.png")).unwrap();
    picture([250, 250, 250], [230, 230, 230], [20, 20, 20]).save(dir.join("product.png")).unwrap();
}

/// A JPEG stored `width`×`height`, red on the left and blue on the right, whose EXIF orientation
/// (6) says "turn 90° clockwise to view", as phones write them: upright it is red on top.
fn sideways_jpeg(width: u32, height: u32) -> Vec<u8> {
    let image =
        RgbImage::from_fn(
            width,
            height,
            |x, _| {
                if x < width / 2 { Rgb([250, 20, 20]) } else { Rgb([20, 20, 250]) }
            },
        );
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image.write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    // APP1 "Exif" right after SOI: a big-endian TIFF header and one IFD entry, Orientation = 6.
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
    exif.extend([0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend([0xff, 0xe1]);
    out.extend(u16::try_from(exif.len() + 2).unwrap().to_be_bytes());
    out.extend(exif);
    out.extend(&jpeg[2..]);
    out
}

/// The photo files the page is given to choose: a real JPEG, a small and a big sideways one, and
/// bytes that are no image at all.
fn write_photo_files(dir: &Path) {
    std::fs::copy(darknet("dog.jpg"), dir.join("desk.jpg")).unwrap();
    std::fs::write(dir.join("sideways.jpg"), sideways_jpeg(64, 32)).unwrap();
    std::fs::write(dir.join("big-sideways.jpg"), sideways_jpeg(4096, 2048)).unwrap();
    std::fs::write(dir.join("broken.jpg"), b"these bytes are not a photo of anything").unwrap();
}

/// Where the browser tests leave their screenshots: `<target>/browser/`.
fn screenshot_path(name: &str) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("browser");
    std::fs::create_dir_all(&target).unwrap();
    target.join(name)
}

/// Runs one scenario of web/tests/demo.mjs against `server`; panics with its output on failure.
async fn run_scenario(scenario: &str, server: &TestServer, env: &[(&str, &str)]) {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: apt-get install -y chromium");
    tokio::task::spawn_blocking(install_node_modules).await.unwrap();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(web_dir().join("tests/demo.mjs"))
        .arg(scenario)
        .env("DESKGEN_URL", &server.base)
        .env("DESKGEN_CHROMIUM", CHROMIUM)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(240), command.output())
        .await
        .unwrap_or_else(|_| panic!("browser scenario {scenario} took over 4 minutes"))
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser scenario {scenario} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("browser scenario {scenario}: ok")), "{stdout}\n{stderr}");
}

/// Every file under `dir`, by path relative to it.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push((path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn the_committed_bundle_is_what_the_sources_build() {
    install_node_modules();
    let web = web_dir();
    let out = tempfile::tempdir().unwrap();
    for args in
        [vec!["run", "-s", "generate"], vec!["exec", "--", "node", "build.mjs", out.path().to_str().unwrap()]]
    {
        let status = std::process::Command::new("npm").args(&args).current_dir(&web).status().unwrap();
        assert!(status.success(), "npm {args:?} failed");
    }
    let built = files_under(out.path());
    let committed = files_under(&web.join("dist"));
    let names = |files: &[(PathBuf, Vec<u8>)]| files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&committed), names(&built));
    for ((path, committed), (_, built)) in committed.iter().zip(&built) {
        assert!(committed == built, "web/dist/{} is stale: run `make web` and commit it", path.display());
    }
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_an_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &["--api-key", "secret"]), ScriptedPipeline::new(1, 1)).await;
    let client = reqwest::Client::new();

    let page = client.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("connect-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/assets/app.js"></script>"#), "{html}");
    assert!(html.contains(r#"href="/assets/style.css""#));
    assert!(!html.contains("//cdn") && !html.contains("https://fonts"), "no outside requests");

    let etag = headers["etag"].clone();
    let again = client.get(server.url("/")).header("if-none-match", etag.clone()).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], etag);

    for (path, content_type, marker) in [
        ("/assets/app.js", "text/javascript; charset=utf-8", "application/grpc-web"),
        ("/assets/style.css", "text/css; charset=utf-8", ".cards"),
    ] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert!(response.text().await.unwrap().contains(marker), "{path}");
    }
    let missing = client.get(server.url("/assets/other.js")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn in_chromium_a_submission_shows_progress_images_cards_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    write_example_images(images.path());
    // Slow enough steps that the live progress bar is seen.
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(6, 150)).await;
    let screenshot = screenshot_path("demo.png");
    run_scenario(
        "scripted",
        &server,
        &[
            ("DESKGEN_IMAGES", images.path().to_str().unwrap()),
            ("DESKGEN_SCREENSHOT", screenshot.to_str().unwrap()),
        ],
    )
    .await;
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "a real screenshot");
    server.stop().await;
}

#[tokio::test]
async fn in_chromium_a_wrong_api_key_shows_an_error_and_the_right_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    write_example_images(images.path());
    let photos = tempfile::tempdir().unwrap();
    write_photo_files(photos.path());
    let server =
        start(serve_config(dir.path(), &["--api-key", "page-key"]), ScriptedPipeline::new(2, 20)).await;
    run_scenario(
        "auth",
        &server,
        &[
            ("DESKGEN_IMAGES", images.path().to_str().unwrap()),
            ("DESKGEN_PHOTOS", photos.path().to_str().unwrap()),
            ("DESKGEN_API_KEY", "page-key"),
        ],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn in_chromium_a_chosen_photo_is_uploaded_upright_small_enough_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    write_example_images(images.path());
    let photos = tempfile::tempdir().unwrap();
    write_photo_files(photos.path());
    let server = start(serve_config(dir.path(), &[]), ScriptedPipeline::new(2, 20)).await;
    run_scenario(
        "photos",
        &server,
        &[
            ("DESKGEN_IMAGES", images.path().to_str().unwrap()),
            ("DESKGEN_PHOTOS", photos.path().to_str().unwrap()),
        ],
    )
    .await;
    // What the page sent is in the store: the JPEG, the one the server turned, the one the browser
    // turned and made smaller; nothing for the refused bytes or for the second generation.
    let mut stored: Vec<(u32, u32)> = files_under(&dir.path().join("images/uploads"))
        .iter()
        .filter(|(path, _)| path.extension().is_some_and(|e| e == "jpg"))
        .map(|(_, bytes)| {
            let image = image::load_from_memory(bytes).unwrap();
            (image.width(), image.height())
        })
        .collect();
    stored.sort();
    assert_eq!(stored, [(32, 64), (768, 576), (1024, 2048)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_real_pipeline_turns_a_photo_into_an_image_and_cards() {
    let dir = tempfile::tempdir().unwrap();
    let host = photo_host(vec![("desk.jpg", std::fs::read(darknet("dog.jpg")).unwrap())]).await;
    // Any photo counts as a desk at threshold 0, so the tiny Stable Diffusion model runs.
    let server = start_real(dir.path(), &["--desk-threshold", "0"]).await;
    let photo = format!("{host}/desk.jpg");
    let photo_file = darknet("dog.jpg");
    let screenshot = screenshot_path("demo-real.png");
    run_scenario(
        "real",
        &server,
        &[
            ("DESKGEN_PHOTO_URL", photo.as_str()),
            ("DESKGEN_PHOTO_FILE", photo_file.to_str().unwrap()),
            ("DESKGEN_SCREENSHOT", screenshot.to_str().unwrap()),
            ("DESKGEN_TIMEOUT_MS", "180000"),
        ],
    )
    .await;
    server.stop().await;
}

/// A page of another origin that tries to submit three tasks to `deskgen`, each with its own
/// task id: a no-cors `text/plain` fetch, a JSON fetch (which needs CORS), and a `text/plain` form
/// post into an iframe.
fn attack_page(deskgen: &str, ids: [&str; 3]) -> String {
    let [no_cors, cors, form] = ids;
    format!(
        r#"<!doctype html><title>working</title>
<iframe name="sink"></iframe>
<form id="f" method="post" enctype="text/plain" target="sink" action="{deskgen}/v1/generate">
<input name='{{"prompt":"a desk from a form","task_id":"{form}","x":"' value='"}}'>
</form>
<script>
(async () => {{
  const url = "{deskgen}/v1/generate";
  const seen = [];
  const body = (prompt, task_id) => JSON.stringify({{ prompt, task_id }});
  try {{
    await fetch(url, {{ method: "POST", mode: "no-cors", headers: {{ "Content-Type": "text/plain" }}, body: body("a desk by fetch", "{no_cors}") }});
    seen.push("no-cors sent");
  }} catch (e) {{ seen.push("no-cors failed"); }}
  try {{
    const r = await fetch(url, {{ method: "POST", headers: {{ "Content-Type": "application/json" }}, body: body("a desk by cors", "{cors}") }});
    seen.push("cors " + r.status);
  }} catch (e) {{ seen.push("cors blocked"); }}
  document.querySelector("iframe").addEventListener("load", () => {{ document.title = "done: " + seen.join(", "); }}, {{ once: true }});
  document.getElementById("f").submit();
}})();
</script>"#
    )
}

/// Serves `html` at `/attack.html` on a port of its own (another origin than deskgen's).
async fn foreign_site(html: String) -> String {
    let app = axum::Router::new().route(
        "/attack.html",
        axum::routing::get(move || {
            let html = html.clone();
            async move { axum::response::Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/attack.html")
}

/// Which of `ids` deskgen knows, as the result route answers.
async fn known_tasks(server: &TestServer, ids: &[&str]) -> Vec<bool> {
    let client = reqwest::Client::new();
    let mut known = Vec::new();
    for id in ids {
        let status = client.get(server.url(&format!("/v1/result/{id}"))).send().await.unwrap().status();
        assert!(status == 200 || status == 404, "{id}: {status}");
        known.push(status == 200);
    }
    known
}

#[tokio::test]
async fn in_chromium_a_page_of_another_origin_cannot_submit_to_an_open_server() {
    for (flags, expected) in [
        (&[][..], [false, false, false]),
        // `*` lets any page read and send JSON, as before; a text/plain body is still not JSON.
        (&["--cors-allow-origin", "*"][..], [false, true, false]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(serve_config(dir.path(), flags), ScriptedPipeline::new(1, 1)).await;
        let ids = ["from-no-cors-fetch", "from-cors-fetch", "from-form-post"];
        let page = foreign_site(attack_page(&server.base, ids)).await;
        run_scenario("foreign", &server, &[("DESKGEN_FOREIGN_URL", &page)]).await;
        assert_eq!(known_tasks(&server, &ids).await, expected, "with {flags:?}");
        server.stop().await;
    }
}
