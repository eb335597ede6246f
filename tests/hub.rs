//! Pulling pipelines from the Hugging Face hub. A hub-protocol server on 127.0.0.1 serves the
//! committed tiny pipeline as repos — revision listing, resolve with ETag and X-Repo-Commit, LFS
//! files redirected to a storage path with Range support — and counts what it is asked, with
//! switches for the faults of a real network: dropped connections, damaged bytes, a server that
//! ignores ranges, a private repo, a download held open.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use deskgen::hub::{HubError, HubSettings, PullStatus, RepoRef};
use deskgen::inference::diffusion::{ClipTokenizer, StableDiffusion};
use deskgen::inference::{Runtime, RuntimeConfig};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

const TOKEN: &str = "hf_test_secret";
/// Bytes a dropped connection delivers before it breaks.
const DROP_AFTER: usize = 100_000;

fn fixture(relative: &str) -> Bytes {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures/tiny-sd15").join(relative);
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files stored in LFS, whose ETag is their sha256 and whose bytes come from a redirect.
fn is_lfs(path: &str) -> bool {
    [".onnx", ".safetensors", ".msgpack", ".png"].iter().any(|ext| path.ends_with(ext))
}

/// A small file's ETag: a git-style blob id (40 hex digits).
fn git_etag(bytes: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("blob {}\0", bytes.len()));
    hasher.update(bytes);
    hex::encode(hasher.finalize())[..40].to_string()
}

/// `vocab.json` and `merges.txt` as CLIP's exports ship them, from the BPE model in the fixture's
/// `tokenizer.json`.
fn vocab_and_merges() -> (Bytes, Bytes) {
    let tokenizer: Value = serde_json::from_slice(&fixture("tokenizer/tokenizer.json")).unwrap();
    let model = &tokenizer["model"];
    let vocab = serde_json::to_vec(&model["vocab"]).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for merge in model["merges"].as_array().unwrap() {
        let line = match merge {
            Value::String(pair) => pair.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        };
        merges.push_str(&line);
        merges.push('\n');
    }
    (Bytes::from(vocab), Bytes::from(merges))
}

/// The tiny pipeline as a hub ONNX repo: its tokenizer as vocab.json + merges.txt (no
/// tokenizer.json), and beside it the PyTorch, Flax and doc files such repos also hold.
fn tiny_repo_files() -> Vec<(String, Bytes)> {
    let mut files: Vec<(String, Bytes)> = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.onnx",
        "text_encoder/weights_map.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/model.onnx",
        "unet/weights_map.json",
        "vae_decoder/config.json",
        "vae_decoder/model.onnx",
        "vae_encoder/config.json",
        "vae_encoder/model.onnx",
    ]
    .iter()
    .map(|path| (path.to_string(), fixture(path)))
    .collect();
    let (vocab, merges) = vocab_and_merges();
    files.push(("tokenizer/vocab.json".into(), vocab));
    files.push(("tokenizer/merges.txt".into(), merges));
    files.extend(skipped_files());
    files
}

/// Files no ONNX pipeline needs; pulling one would be a bug.
fn skipped_files() -> Vec<(String, Bytes)> {
    let fake = |n: u8| Bytes::from(vec![n; 4096]);
    vec![
        (".gitattributes".into(), Bytes::from_static(b"*.onnx filter=lfs\n")),
        ("README.md".into(), Bytes::from_static(b"# tiny\n")),
        ("sample.png".into(), fake(1)),
        ("unet/diffusion_pytorch_model.safetensors".into(), fake(2)),
        ("text_encoder/model.safetensors".into(), fake(3)),
        ("vae_decoder/flax_model.msgpack".into(), fake(4)),
        ("vae_decoder/diffusion_pytorch_model.bin".into(), fake(5)),
    ]
}

/// The smallest repo that passes as an ONNX pipeline: model_index.json and the VAE decoder.
fn mini_repo_files() -> Vec<(String, Bytes)> {
    ["model_index.json", "vae_decoder/config.json", "vae_decoder/model.onnx"]
        .iter()
        .map(|path| (path.to_string(), fixture(path)))
        .collect()
}

/// A repo of the test hub.
struct Repo {
    commit: String,
    refs: Vec<&'static str>,
    files: BTreeMap<String, Bytes>,
    token: Option<&'static str>,
}

impl Repo {
    fn new(name: &str, files: Vec<(String, Bytes)>) -> Repo {
        Repo {
            commit: sha256(name.as_bytes())[..40].to_string(),
            refs: vec!["main", "v1"],
            files: files.into_iter().collect(),
            token: None,
        }
    }

    fn private(mut self) -> Repo {
        self.token = Some(TOKEN);
        self
    }

    fn etag(&self, path: &str) -> String {
        let bytes = &self.files[path];
        if is_lfs(path) { sha256(bytes) } else { git_etag(bytes) }
    }
}

/// One request the hub answered.
#[derive(Debug, Clone)]
struct Hit {
    method: Method,
    /// "api", "resolve" or "lfs".
    kind: &'static str,
    /// The repo file it was about (the revision for "api").
    path: String,
    range: Option<u64>,
    authorization: Option<String>,
}

/// Faults the next requests meet.
#[derive(Default)]
struct Faults {
    /// File → break the connection after DROP_AFTER bytes, this many more times.
    drop: HashMap<String, u32>,
    /// File → flip a byte of the body, this many more times.
    corrupt: HashMap<String, u32>,
    /// Answer ranged requests with the whole file.
    ignore_range: bool,
    /// File → its body waits for a permit.
    hold: HashMap<String, Arc<Semaphore>>,
}

struct HubState {
    repos: HashMap<String, Repo>,
    /// sha256 → (repo, path) of every LFS file.
    lfs: HashMap<String, (String, String)>,
    hits: Mutex<Vec<Hit>>,
    faults: Mutex<Faults>,
}

/// The test hub, serving until dropped or stopped.
struct TestHub {
    endpoint: String,
    state: Arc<HubState>,
    task: tokio::task::JoinHandle<()>,
}

impl TestHub {
    async fn start(repos: Vec<(&str, Repo)>) -> TestHub {
        let mut lfs = HashMap::new();
        for (name, repo) in &repos {
            for path in repo.files.keys().filter(|path| is_lfs(path)) {
                lfs.insert(repo.etag(path), (name.to_string(), path.clone()));
            }
        }
        let state = Arc::new(HubState {
            repos: repos.into_iter().map(|(name, repo)| (name.to_string(), repo)).collect(),
            lfs,
            hits: Mutex::default(),
            faults: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/api/models/{*rest}", get(revision_info))
            .route("/{org}/{name}/resolve/{commit}/{*path}", get(resolve))
            .route("/lfs-storage/{sha}", get(lfs_file))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestHub { endpoint, state, task }
    }

    /// Settings for a pull from this hub into `cache`.
    fn settings(&self, cache: &Path) -> HubSettings {
        HubSettings {
            endpoint: self.endpoint.clone(),
            token: None,
            cache_dir: cache.to_path_buf(),
            offline: false,
        }
    }

    fn commit(&self, repo: &str) -> String {
        self.state.repos[repo].commit.clone()
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// GETs that carried a file's bytes.
    fn downloads(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|hit| {
                hit.method == Method::GET
                    && (hit.kind == "lfs" || (hit.kind == "resolve" && !is_lfs(&hit.path)))
            })
            .collect()
    }

    fn downloads_of(&self, path: &str) -> Vec<Hit> {
        self.downloads().into_iter().filter(|hit| hit.path == path).collect()
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.state.faults.lock().unwrap()
    }

    /// Stops answering: the port is closed.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl HubState {
    fn record(&self, method: &Method, kind: &'static str, path: &str, headers: &HeaderMap) {
        let text = |name| headers.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok());
        let range =
            text(header::RANGE).and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok());
        self.hits.lock().unwrap().push(Hit {
            method: method.clone(),
            kind,
            path: path.to_string(),
            range,
            authorization: text(header::AUTHORIZATION).map(str::to_string),
        });
    }

    /// The repo, when the request may see it: 401 for a private one without its token, 404 when
    /// there is none (with the hub's error code).
    fn repo(&self, name: &str, headers: &HeaderMap) -> Result<&Repo, Box<Response>> {
        let Some(repo) = self.repos.get(name) else {
            return Err(refusal(StatusCode::NOT_FOUND, "RepoNotFound"));
        };
        let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match repo.token {
            Some(token) if sent != Some(format!("Bearer {token}").as_str()) => {
                Err(refusal(StatusCode::UNAUTHORIZED, "GatedRepo"))
            }
            _ => Ok(repo),
        }
    }
}

/// The hub's refusal: a status and its `X-Error-Code`.
fn refusal(status: StatusCode, code: &'static str) -> Box<Response> {
    Box::new((status, [("x-error-code", code)]).into_response())
}

/// `GET /api/models/{org}/{name}/revision/{revision}`.
async fn revision_info(
    State(hub): State<Arc<HubState>>,
    UrlPath(rest): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let (name, revision) = rest.split_once("/revision/").unwrap();
    hub.record(&Method::GET, "api", revision, &headers);
    let repo = match hub.repo(name, &headers) {
        Ok(repo) => repo,
        Err(refused) => return *refused,
    };
    if !repo.refs.contains(&revision) && revision != repo.commit {
        return *refusal(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    let siblings: Vec<Value> = repo.files.keys().map(|path| json!({"rfilename": path})).collect();
    axum::Json(json!({"id": name, "sha": repo.commit, "siblings": siblings})).into_response()
}

/// `GET|HEAD /{org}/{name}/resolve/{commit}/{path}`: small files inline, LFS files redirected.
async fn resolve(
    State(hub): State<Arc<HubState>>,
    UrlPath((org, name, commit, path)): UrlPath<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    hub.record(&method, "resolve", &path, &headers);
    let repo = match hub.repo(&format!("{org}/{name}"), &headers) {
        Ok(repo) => repo,
        Err(refused) => return *refused,
    };
    let Some(bytes) = repo.files.get(&path).filter(|_| commit == repo.commit) else {
        return *refusal(StatusCode::NOT_FOUND, "EntryNotFound");
    };
    let etag = repo.etag(&path);
    let commit_header = [("x-repo-commit", repo.commit.clone())];
    if is_lfs(&path) {
        // Absolute, as the hub's redirects to its storage host are: clients follow only those
        // to the file's bytes (a relative one means a renamed repo).
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
        let headers = [
            (header::LOCATION.as_str(), format!("http://{host}/lfs-storage/{etag}")),
            ("x-linked-etag", format!("\"{etag}\"")),
            ("x-linked-size", bytes.len().to_string()),
        ];
        return (StatusCode::FOUND, commit_header, headers).into_response();
    }
    let mut response = file_body(&hub, &method, &path, bytes.clone(), &headers);
    response.headers_mut().insert(header::ETAG, format!("W/\"{etag}\"").parse().unwrap());
    (commit_header, response).into_response()
}

/// `GET /lfs-storage/{sha256}`: storage behind the redirect (no token, no hub headers).
async fn lfs_file(
    State(hub): State<Arc<HubState>>,
    UrlPath(sha): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let Some((repo, path)) = hub.lfs.get(&sha) else { return StatusCode::NOT_FOUND.into_response() };
    hub.record(&method, "lfs", path, &headers);
    let bytes = hub.repos[repo].files[path].clone();
    file_body(&hub, &method, path, bytes, &headers)
}

/// The file's bytes from the requested range on, with the faults switched on for it.
fn file_body(hub: &HubState, method: &Method, path: &str, bytes: Bytes, headers: &HeaderMap) -> Response {
    let asked = headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok()?.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    let mut faults = hub.faults.lock().unwrap();
    let start = if faults.ignore_range { 0 } else { asked.unwrap_or(0) };
    let total = bytes.len();
    let mut body = bytes.slice(start..).to_vec();
    let (mut dropped, mut held) = (false, None);
    if *method == Method::GET {
        if take(&mut faults.corrupt, path) {
            body[0] ^= 0xff;
        }
        dropped = take(&mut faults.drop, path);
        held = faults.hold.get(path).cloned();
    }
    drop(faults);
    let length = body.len();
    let chunks: Vec<Result<Bytes, std::io::Error>> = if dropped {
        vec![Ok(Bytes::from(body[..DROP_AFTER].to_vec())), Err(std::io::Error::other("connection dropped"))]
    } else {
        body.chunks(64 * 1024).map(|chunk| Ok(Bytes::from(chunk.to_vec()))).collect()
    };
    let stream = futures::stream::iter(chunks).then(move |chunk| {
        let held = held.clone();
        async move {
            if let Some(gate) = held {
                gate.acquire().await.unwrap().forget();
                gate.add_permits(1);
            }
            if chunk.is_err() {
                // Let the first bytes reach the client before the connection breaks.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            chunk
        }
    });
    let status = if start > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut response = Response::builder().status(status).header(header::CONTENT_LENGTH, length);
    if start > 0 {
        response = response.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{total}", total - 1));
    }
    response.body(Body::from_stream(stream)).unwrap()
}

/// Uses up one of the fault's remaining times for `path`.
fn take(counts: &mut HashMap<String, u32>, path: &str) -> bool {
    match counts.get_mut(path) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

fn repo_ref(spec: &str) -> RepoRef {
    spec.parse().unwrap()
}

async fn pull(settings: &HubSettings, spec: &str) -> Result<PathBuf, HubError> {
    deskgen::hub::pull(settings, &repo_ref(spec), None, PullStatus::new(spec).as_ref()).await
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

fn runtime() -> Runtime {
    Runtime::init(&RuntimeConfig { intra_threads: 1, ..RuntimeConfig::default() })
        .expect("ONNX Runtime loads")
}

#[tokio::test]
async fn a_pull_gives_a_loadable_pipeline_in_the_huggingface_hub_layout_and_is_not_repeated() {
    let hub = TestHub::start(vec![("org/tiny", Repo::new("org/tiny", tiny_repo_files()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let settings = hub.settings(cache.path());
    let status = PullStatus::new("org/tiny@main");
    let dir = deskgen::hub::pull(&settings, &repo_ref("org/tiny"), None, status.as_ref()).await.unwrap();

    let commit = hub.commit("org/tiny");
    let root = repo_dir(cache.path(), "org/tiny");
    assert_eq!(dir, root.join("snapshots").join(&commit));
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        commit,
        "refs/main: the commit, no newline"
    );
    let unet = fixture("unet/model.onnx");
    let unet_link = std::fs::read_link(dir.join("unet/model.onnx")).unwrap();
    assert_eq!(unet_link, Path::new("../../../blobs").join(sha256(&unet)), "LFS blob named by its sha256");
    assert_eq!(std::fs::read(dir.join("unet/model.onnx")).unwrap(), unet);
    let index_link = std::fs::read_link(dir.join("model_index.json")).unwrap();
    assert_eq!(index_link, Path::new("../../blobs").join(git_etag(&fixture("model_index.json"))));
    let blobs: Vec<String> = std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(blobs.iter().all(|name| !name.ends_with(".incomplete")), "{blobs:?}");
    for (skipped, _) in skipped_files() {
        assert!(!dir.join(&skipped).exists(), "{skipped} was pulled");
        assert!(hub.hits().iter().all(|hit| hit.path != skipped), "{skipped} was asked for");
    }
    let report = status.report();
    assert_eq!((report.files_done, report.files_total), (16, 16), "{report:?}");
    assert_eq!(report.bytes_done, report.bytes_total);

    // The tokenizer comes from vocab.json + merges.txt: the repo has no tokenizer.json.
    assert!(!dir.join("tokenizer/tokenizer.json").exists());
    let pipeline = StableDiffusion::load(&runtime(), &dir).expect("the pulled folder loads");
    assert_eq!(pipeline.native_size(), (256, 256));

    let downloads = hub.downloads().len();
    let hits = hub.hits().len();
    let again = PullStatus::new("org/tiny@main");
    assert_eq!(
        deskgen::hub::pull(&settings, &repo_ref("org/tiny"), None, again.as_ref()).await.unwrap(),
        dir
    );
    assert_eq!(hub.downloads().len(), downloads, "nothing is downloaded twice");
    assert_eq!(hub.hits().len(), hits + 1, "only the revision is asked for");
    assert_eq!(again.report().files_done, 16);
    // Another name for the same commit costs no download either, and gets its ref.
    assert_eq!(pull(&settings, "org/tiny@v1").await.unwrap(), dir);
    assert_eq!(std::fs::read_to_string(root.join("refs/v1")).unwrap(), commit);
    assert_eq!(hub.downloads().len(), downloads);
}

/// A Turbo repo is pulled with the steps, guidance and size it is made for; an edit of that file
/// survives the next pull.
#[tokio::test]
async fn a_turbo_repo_gets_its_generation_defaults() {
    let hub =
        TestHub::start(vec![("stabilityai/sd-turbo", Repo::new("stabilityai/sd-turbo", tiny_repo_files()))])
            .await;
    let cache = tempfile::tempdir().unwrap();
    let settings = hub.settings(cache.path());
    let dir = pull(&settings, "stabilityai/sd-turbo").await.unwrap();
    let pipeline = StableDiffusion::load(&runtime(), &dir).expect("the pulled folder loads");
    assert_eq!(pipeline.defaults().num_inference_steps, Some(1));
    assert_eq!(pipeline.defaults().guidance_scale, Some(0.0));
    assert_eq!(pipeline.native_size(), (512, 512));
    let edited = r#"{"num_inference_steps": 2}"#;
    std::fs::write(dir.join("deskgen-defaults.json"), edited).unwrap();
    pull(&settings, "stabilityai/sd-turbo").await.unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("deskgen-defaults.json")).unwrap(), edited);
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_a_range_request() {
    let hub = TestHub::start(vec![("org/mini", Repo::new("org/mini", mini_repo_files()))]).await;
    let cache = tempfile::tempdir().unwrap();
    hub.faults().drop.insert("vae_decoder/model.onnx".into(), 1);
    let dir = pull(&hub.settings(cache.path()), "org/mini").await.unwrap();

    let fetches = hub.downloads_of("vae_decoder/model.onnx");
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    assert_eq!(fetches[0].range, None);
    let resumed_at = fetches[1].range.expect("the second request resumes");
    assert!(resumed_at > 0 && resumed_at <= DROP_AFTER as u64, "resumed at {resumed_at}");
    assert_eq!(std::fs::read(dir.join("vae_decoder/model.onnx")).unwrap(), fixture("vae_decoder/model.onnx"));
}

#[tokio::test]
async fn a_partial_download_is_resumed_even_from_a_server_that_ignores_ranges() {
    let hub = TestHub::start(vec![("org/mini", Repo::new("org/mini", mini_repo_files()))]).await;
    let onnx = fixture("vae_decoder/model.onnx");
    let partial = |cache: &Path| {
        let blobs = repo_dir(cache, "org/mini").join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(format!("{}.incomplete", sha256(&onnx))), &onnx[..onnx.len() / 2]).unwrap();
    };
    let cache = tempfile::tempdir().unwrap();
    partial(cache.path());
    let dir = pull(&hub.settings(cache.path()), "org/mini").await.unwrap();
    let fetches = hub.downloads_of("vae_decoder/model.onnx");
    assert_eq!(fetches.iter().map(|hit| hit.range).collect::<Vec<_>>(), [Some(onnx.len() as u64 / 2)]);
    assert_eq!(std::fs::read(dir.join("vae_decoder/model.onnx")).unwrap(), onnx);

    hub.faults().ignore_range = true;
    let cache = tempfile::tempdir().unwrap();
    partial(cache.path());
    let dir = pull(&hub.settings(cache.path()), "org/mini").await.unwrap();
    assert_eq!(std::fs::read(dir.join("vae_decoder/model.onnx")).unwrap(), onnx, "the whole file, once");
}

#[tokio::test]
async fn damaged_bytes_in_the_cache_or_on_the_wire_are_fetched_again() {
    let hub = TestHub::start(vec![("org/mini", Repo::new("org/mini", mini_repo_files()))]).await;
    let onnx = fixture("vae_decoder/model.onnx");
    let path = "vae_decoder/model.onnx";
    let cache = tempfile::tempdir().unwrap();
    let settings = hub.settings(cache.path());
    let dir = pull(&settings, "org/mini").await.unwrap();
    let blob = repo_dir(cache.path(), "org/mini").join("blobs").join(sha256(&onnx));
    let mut damaged = onnx.to_vec();
    damaged[1000] ^= 0x55;
    std::fs::write(&blob, damaged).unwrap();
    pull(&settings, "org/mini").await.unwrap();
    assert_eq!(hub.downloads_of(path).len(), 2, "the damaged blob is fetched again");
    assert_eq!(std::fs::read(dir.join(path)).unwrap(), onnx);

    // Damaged once in transit: refetched; damaged every time: a clear failure, nothing cached.
    hub.faults().corrupt.insert(path.into(), 1);
    let cache = tempfile::tempdir().unwrap();
    let dir = pull(&hub.settings(cache.path()), "org/mini").await.unwrap();
    assert_eq!(hub.downloads_of(path).len(), 4);
    assert_eq!(std::fs::read(dir.join(path)).unwrap(), onnx);

    hub.faults().corrupt.insert(path.into(), 2);
    let cache = tempfile::tempdir().unwrap();
    let error = pull(&hub.settings(cache.path()), "org/mini").await.unwrap_err().to_string();
    assert!(error.contains(path) && error.contains("sha256") && error.contains("second download"), "{error}");
    let blobs = repo_dir(cache.path(), "org/mini").join("blobs");
    assert!(
        !blobs.join(sha256(&onnx)).exists() && !blobs.join(format!("{}.incomplete", sha256(&onnx))).exists()
    );
}

#[tokio::test]
async fn offline_pulls_use_the_cache_alone_and_say_what_is_missing() {
    let hub = TestHub::start(vec![("org/mini", Repo::new("org/mini", mini_repo_files()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let online = hub.settings(cache.path());
    let dir = pull(&online, "org/mini").await.unwrap();
    let commit = hub.commit("org/mini");
    hub.stop().await;

    let offline = HubSettings { offline: true, ..online };
    assert_eq!(pull(&offline, "org/mini").await.unwrap(), dir);
    assert_eq!(pull(&offline, &format!("org/mini@{commit}")).await.unwrap(), dir);
    let error = pull(&offline, "org/absent@main").await.unwrap_err().to_string();
    for needed in ["org/absent", "main", &cache.path().display().to_string(), "HF_HUB_OFFLINE"] {
        assert!(error.contains(needed), "{needed} missing from: {error}");
    }
    let error = pull(&offline, "org/mini@v9").await.unwrap_err().to_string();
    assert!(error.contains("org/mini@v9") && error.contains("HF_HUB_OFFLINE"), "{error}");
}

#[tokio::test]
async fn a_private_repo_needs_hf_token() {
    let hub =
        TestHub::start(vec![("org/private", Repo::new("org/private", mini_repo_files()).private())]).await;
    let cache = tempfile::tempdir().unwrap();
    let error = pull(&hub.settings(cache.path()), "org/private").await.unwrap_err().to_string();
    assert!(error.contains("HF_TOKEN") && error.contains("401") && error.contains("org/private"), "{error}");

    let with_token = HubSettings { token: Some(TOKEN.into()), ..hub.settings(cache.path()) };
    let dir = pull(&with_token, "org/private").await.unwrap();
    assert!(dir.join("vae_decoder/model.onnx").is_file());
    let bearer = format!("Bearer {TOKEN}");
    let to_hub: Vec<Hit> = hub.hits().into_iter().filter(|hit| hit.kind != "lfs").skip(1).collect();
    assert!(!to_hub.is_empty() && to_hub.iter().all(|hit| hit.authorization.as_deref() == Some(&bearer)));
}

#[tokio::test]
async fn a_pytorch_only_repo_points_to_the_export_script_and_downloads_nothing() {
    let pytorch = vec![
        ("model_index.json".to_string(), fixture("model_index.json")),
        ("unet/config.json".to_string(), fixture("unet/config.json")),
        ("unet/diffusion_pytorch_model.safetensors".to_string(), Bytes::from(vec![7; 4096])),
        ("text_encoder/model.safetensors".to_string(), Bytes::from(vec![8; 4096])),
    ];
    let hub = TestHub::start(vec![("org/pytorch", Repo::new("org/pytorch", pytorch))]).await;
    let cache = tempfile::tempdir().unwrap();
    let error = pull(&hub.settings(cache.path()), "org/pytorch").await.unwrap_err().to_string();
    assert!(
        error.contains("no ONNX export") && error.contains("onnx/export_sd.sh org/pytorch OUT_DIR"),
        "{error}"
    );
    assert!(hub.hits().iter().all(|hit| hit.kind == "api"), "{:?}", hub.hits());
    assert!(!repo_dir(cache.path(), "org/pytorch").join("blobs").exists());
}

#[tokio::test]
async fn unknown_repos_and_revisions_are_named() {
    let hub = TestHub::start(vec![("org/mini", Repo::new("org/mini", mini_repo_files()))]).await;
    let cache = tempfile::tempdir().unwrap();
    let error = pull(&hub.settings(cache.path()), "org/nothing").await.unwrap_err().to_string();
    assert!(error.contains("repo org/nothing not found"), "{error}");
    let error = pull(&hub.settings(cache.path()), "org/mini@refs/pr/9").await.unwrap_err().to_string();
    assert!(error.contains("revision refs/pr/9 of org/mini not found"), "{error}");
    let asked: Vec<String> = hub.hits().iter().map(|hit| hit.path.clone()).collect();
    assert_eq!(asked, ["main", "refs/pr/9"], "the revision travels as one path segment");
}

#[test]
fn vocab_and_merges_give_the_ids_of_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let (vocab, merges) = vocab_and_merges();
    std::fs::write(dir.path().join("vocab.json"), vocab).unwrap();
    std::fs::write(dir.path().join("merges.txt"), merges).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), fixture("tokenizer/tokenizer_config.json"))
        .unwrap();
    let built = ClipTokenizer::from_dir(dir.path()).unwrap();
    let saved = ClipTokenizer::from_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures/tiny-sd15/tokenizer"),
    )
    .unwrap();
    let long = "a very long prompt about a wooden desk with a lamp, ".repeat(20);
    let prompts = [
        "a photo of a cat",
        "A Minimal DESK setup, 4K, f/1.8 -- it's 2024!!! (masterpiece:1.2) #desk @home",
        "  spaces\tand\nnewlines   everywhere ",
        "책상 위의 노트북, 日本語のテキスト, café ünïcödé, emoji 🚀🔥",
        "<|startoftext|>already marked<|endoftext|>",
        "",
        long.as_str(),
    ];
    for prompt in prompts {
        let ids = built.encode(prompt).unwrap();
        assert_eq!(ids, saved.encode(prompt).unwrap(), "{prompt:?}");
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 49406);
    }
    let cut = built.encode(&long).unwrap();
    assert_eq!(cut[76], 49407, "a long prompt keeps its end token");
}

/// `deskgen` with the hub at `endpoint` and its cache under `home`, nothing else from this
/// process's HF_* settings.
fn deskgen(endpoint: &str, home: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_deskgen"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for name in ["HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"] {
        command.env_remove(name);
    }
    command
}

#[tokio::test]
async fn models_pull_prints_the_folder_to_load() {
    let nested: Vec<(String, Bytes)> = mini_repo_files()
        .into_iter()
        .map(|(path, bytes)| (format!("onnx/{path}"), bytes))
        .chain(skipped_files())
        .chain([("model_index.json".to_string(), fixture("model_index.json"))])
        .collect();
    let hub = TestHub::start(vec![("org/nested", Repo::new("org/nested", nested))]).await;
    let home = tempfile::tempdir().unwrap();
    let output = deskgen(&hub.endpoint, home.path())
        .args(["models", "pull", "org/nested@main", "--subfolder", "onnx"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let snapshot =
        repo_dir(&home.path().join("hub"), "org/nested").join("snapshots").join(hub.commit("org/nested"));
    assert_eq!(String::from_utf8(output.stdout).unwrap(), format!("{}\n", snapshot.join("onnx").display()));
    assert!(stderr.contains("fetched onnx/vae_decoder/model.onnx"), "{stderr}");
    let link = std::fs::read_link(snapshot.join("onnx/vae_decoder/model.onnx")).unwrap();
    assert!(link.starts_with("../../../../blobs/"), "{}", link.display());
    assert!(!snapshot.join("model_index.json").exists(), "only the subfolder is pulled");

    let output =
        deskgen(&hub.endpoint, home.path()).args(["models", "pull", "org/nested"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("no ONNX pipeline") && stderr.contains("one is in: onnx (pass --subfolder DIR)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_pulls_its_hub_model_while_health_shows_the_download() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let hub = TestHub::start(vec![("org/tiny", Repo::new("org/tiny", tiny_repo_files()))]).await;
    let gate = Arc::new(Semaphore::new(0));
    hub.faults().hold.insert("unet/model.onnx".into(), gate.clone());
    let home = tempfile::tempdir().unwrap();
    let log = home.path().join("serve.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = deskgen(&hub.endpoint, home.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--intra-threads", "1"])
        .args(["--sd-model", "hf:org/tiny@main", "--data-dir"])
        .arg(home.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let health = async || -> Option<(u16, Value)> {
        let response = http.get(format!("{base}/healthcheck")).send().await.ok()?;
        Some((response.status().as_u16(), response.json().await.ok()?))
    };

    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Some((503, body)) = health().await
            && body["download"]["files_total"].as_u64().unwrap_or(0) > 0
        {
            break body;
        }
        assert!(
            Instant::now() < deadline && server.try_wait().unwrap().is_none(),
            "no download in the health document:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let download = &body["download"];
    assert_eq!(download["repo"], "org/tiny@main", "{body}");
    assert_eq!(download["model"], "tiny", "the model is named after its repo: {body}");
    assert_eq!(body["components"]["models"], "loading");
    assert!(download["files_done"].as_u64() < download["files_total"].as_u64(), "{body}");
    assert!(download["bytes_done"].as_u64() < download["bytes_total"].as_u64(), "{body}");
    let channel = tonic::transport::Endpoint::from_shared(base.clone()).unwrap().connect().await.unwrap();
    let mut grpc_health = HealthClient::new(channel);
    let check = || HealthCheckRequest { service: String::new() };
    assert_eq!(grpc_health.check(check()).await.unwrap().into_inner().status(), ServingStatus::NotServing);

    gate.add_permits(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Some((200, body)) = health().await {
            break body;
        }
        if let Some(status) = server.try_wait().unwrap() {
            panic!("deskgen exited with {status}:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        assert!(Instant::now() < deadline, "never ready after the download");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.get("download").is_none(), "{body}");
    assert_eq!(grpc_health.check(check()).await.unwrap().into_inner().status(), ServingStatus::Serving);
    let snapshot =
        repo_dir(&home.path().join("hub"), "org/tiny").join("snapshots").join(hub.commit("org/tiny"));
    assert!(snapshot.join("unet/model.onnx").is_file());
    server.kill().await.unwrap();
}

/// Python's `huggingface_hub` and deskgen read each other's cache: each pulls from the test hub
/// into a fresh cache and the other finds every file there offline. Needs a Python with
/// `huggingface_hub` (the export venv has it): `DESKGEN_HUB_PYTHON=~/.cache/deskgen/venv-export/bin/python
/// cargo test --test hub -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs DESKGEN_HUB_PYTHON, a Python with huggingface_hub"]
async fn python_huggingface_hub_shares_the_cache() {
    let python = std::env::var("DESKGEN_HUB_PYTHON").expect("DESKGEN_HUB_PYTHON");
    let hub = TestHub::start(vec![("org/tiny", Repo::new("org/tiny", tiny_repo_files()))]).await;
    let snapshot = |cache: &Path, offline: bool| {
        let script = "import sys; from huggingface_hub import snapshot_download; \
            print(snapshot_download('org/tiny', cache_dir=sys.argv[1], allow_patterns=['*.json', '*.txt', '*.onnx']))";
        let mut command = tokio::process::Command::new(&python);
        command.args(["-c", script]).arg(cache).env("HF_ENDPOINT", &hub.endpoint);
        command.env("HF_HUB_OFFLINE", if offline { "1" } else { "0" }).env("HF_HUB_DISABLE_TELEMETRY", "1");
        command
    };
    let read = |output: std::process::Output| {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    };

    let ours = tempfile::tempdir().unwrap();
    let dir = pull(&hub.settings(ours.path()), "org/tiny").await.unwrap();
    let fetched = hub.downloads().len();
    let seen = read(snapshot(ours.path(), true).output().await.unwrap());
    assert_eq!(seen, dir, "Python finds deskgen's snapshot offline");
    assert_eq!(std::fs::read(seen.join("unet/model.onnx")).unwrap(), fixture("unet/model.onnx"));

    let theirs = tempfile::tempdir().unwrap();
    let python_dir = read(snapshot(theirs.path(), false).output().await.unwrap());
    assert!(hub.downloads().len() > fetched, "Python downloaded from the test hub");
    let offline = HubSettings { offline: true, ..hub.settings(theirs.path()) };
    assert_eq!(
        pull(&offline, "org/tiny").await.unwrap(),
        python_dir,
        "deskgen finds Python's snapshot offline"
    );
    let before = hub.downloads().len();
    assert_eq!(pull(&hub.settings(theirs.path()), "org/tiny").await.unwrap(), python_dir);
    assert_eq!(hub.downloads().len(), before, "nothing Python fetched is fetched again");
    StableDiffusion::load(&runtime(), &python_dir).expect("Python's download loads");
}
