//! Command-line configuration: one clap-derived struct per subcommand, every flag with an env var.
//! The only place that knows the command line: the engine, the pipeline and the services take
//! plain config structs, which [`flags`] fills.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod flags;

use crate::pipeline::PipelineConfig;
use crate::webhook::WebhookConfig;

/// deskgen: a desk photo in, an improved desk-setup image and shopping links out.
#[derive(Debug, Parser)]
#[command(name = "deskgen", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC, grpc-web and REST on one listener, with embedded workers.
    Serve(Box<ServeConfig>),
    /// Run tasks from a shared Redis queue, without the API (health and metrics only).
    Worker(Box<WorkerConfig>),
    /// Measure the desk decision over a folder of labelled photos (desk/ and not_desk/).
    Eval(EvalCommand),
    /// List the models the pipeline loads: id, path, sha256, size, inputs/outputs, execution
    /// provider; `models pull` fetches a pipeline from the Hugging Face hub.
    Models(ModelsCommand),
    /// Run the whole pipeline once, locally, without a server; writes the PNG and prints the result.
    Generate(Box<GenerateCommand>),
    /// Time Stable Diffusion text-to-image at the model's native size and print a JSON report.
    Bench(BenchCommand),
}

/// Settings of `deskgen generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateCommand {
    /// The desk photo: a local file, or an https/http/s3 URL.
    #[arg(long, env = "DESKGEN_IMAGE")]
    pub image: Option<String>,
    /// The user's text; alone it means text-to-image.
    #[arg(long, env = "DESKGEN_PROMPT")]
    pub prompt: Option<String>,
    /// What the image should not show (default: the configured list).
    #[arg(long, env = "DESKGEN_NEGATIVE_PROMPT")]
    pub negative_prompt: Option<String>,
    /// Denoising steps (1..=150).
    #[arg(long, env = "DESKGEN_STEPS")]
    pub steps: Option<i64>,
    /// Classifier-free guidance scale (0..=30).
    #[arg(long, env = "DESKGEN_GUIDANCE_SCALE")]
    pub guidance_scale: Option<f64>,
    /// Output width in pixels (default: the photo's shape at the model's native area).
    #[arg(long, env = "DESKGEN_WIDTH")]
    pub width: Option<i64>,
    /// Output height in pixels (default: the photo's shape at the model's native area).
    #[arg(long, env = "DESKGEN_HEIGHT")]
    pub height: Option<i64>,
    /// How the photo is shaped to the output: fit (its aspect ratio at the native area), crop (the
    /// native square, centre-cropped), fill (the square, edges extended) or stretch.
    #[arg(long, env = "DESKGEN_RESIZE_MODE")]
    pub resize_mode: Option<String>,
    /// How much of the photo to repaint, in (0, 1].
    #[arg(long, env = "DESKGEN_STRENGTH")]
    pub strength: Option<f64>,
    /// Seed; the same seed and inputs give the same image.
    #[arg(long, env = "DESKGEN_SEED")]
    pub seed: Option<u64>,
    /// Scheduler id (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm).
    #[arg(long, env = "DESKGEN_SCHEDULER")]
    pub scheduler: Option<String>,
    /// Stable Diffusion model, by the name of one `--sd-model` (the first when unset).
    #[arg(long, env = "DESKGEN_MODEL")]
    pub model: Option<String>,
    /// Images to draw in one batch (1..=--max-images), from seeds seed, seed+1, …; the second and
    /// later go beside `--out` as NAME-2.png, NAME-3.png, …
    #[arg(long, env = "DESKGEN_NUM_IMAGES")]
    pub num_images: Option<i64>,
    /// Offers per recommended category (1..=10).
    #[arg(long, env = "DESKGEN_MAX_ITEMS_PER_CATEGORY")]
    pub max_items_per_category: Option<i64>,
    /// A ControlNet unit as TYPE or TYPE:SCALE (repeatable), instead of the default control of
    /// desk photos; canny's image is made from the photo.
    #[arg(
        long = "control",
        env = "DESKGEN_CONTROL",
        value_delimiter = ',',
        value_name = "TYPE[:SCALE]",
        conflicts_with = "no_control"
    )]
    pub control: Vec<String>,
    /// No ControlNet guidance, not even the default for desk photos.
    #[arg(long, env = "DESKGEN_NO_CONTROL")]
    pub no_control: bool,
    /// Inpainting mask (white repaints, black keeps): a local file, or an https/http/s3 URL.
    #[arg(long, env = "DESKGEN_MASK", conflicts_with_all = ["keep", "repaint"])]
    pub mask: Option<String>,
    /// Items to keep as they are (item names or detector labels, comma-separated); the rest is
    /// repainted.
    #[arg(long, env = "DESKGEN_KEEP", value_delimiter = ',', conflicts_with = "repaint")]
    pub keep: Vec<String>,
    /// Items to repaint (comma-separated); the rest is kept.
    #[arg(long, env = "DESKGEN_REPAINT", value_delimiter = ',')]
    pub repaint: Vec<String>,
    /// Put the photo's pixels back outside the mask.
    #[arg(long, env = "DESKGEN_PRESERVE_UNMASKED")]
    pub preserve_unmasked: bool,
    /// Gaussian blur radius of the mask, in output pixels (0..=64).
    #[arg(long, env = "DESKGEN_MASK_BLUR")]
    pub mask_blur: Option<f64>,
    /// Generate only the masked region grown by this many pixels, then paste it back.
    #[arg(long, env = "DESKGEN_PADDING_MASK_CROP")]
    pub padding_mask_crop: Option<i64>,
    /// Where to write the generated PNG; with `--num-images`, the others go beside it as NAME-2.png, ….
    #[arg(long, env = "DESKGEN_OUT", default_value = "result.png")]
    pub out: PathBuf,
    /// Print the result JSON (the REST shape) instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Folder for the file object store while generating.
    #[arg(long, env = "DESKGEN_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Models, object store, photo fetching and shopping.
    #[command(flatten)]
    pub pipeline: PipelineConfig,
}

/// Settings of `deskgen bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchCommand {
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: crate::inference::RuntimeConfig,
    /// Stable Diffusion pipeline folder (or a folder holding `cpu/` and `cuda/` exports), or
    /// `hf:REPO[@REVISION][:SUBFOLDER]` to pull it from the Hugging Face hub first.
    #[arg(long, env = "DESKGEN_SD_MODEL", default_value = "onnx/fixtures/tiny-sd15")]
    pub sd_model: PathBuf,
    /// Denoising step counts to time, each with guidance 7.5.
    #[arg(long, env = "DESKGEN_BENCH_STEPS", value_delimiter = ',', default_value = "30,50")]
    pub steps: Vec<u32>,
    /// Generations per step count.
    #[arg(long, env = "DESKGEN_BENCH_RUNS", default_value_t = 2)]
    pub runs: u32,
    /// Scheduler (the model's own when unset).
    #[arg(long, env = "DESKGEN_BENCH_SCHEDULER")]
    pub scheduler: Option<String>,
    /// Prompt of every generation.
    #[arg(
        long,
        env = "DESKGEN_BENCH_PROMPT",
        default_value = "a tidy wooden desk with a monitor and a lamp, photo"
    )]
    pub prompt: String,
}

/// Settings of `deskgen eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalCommand {
    /// Folder with `desk/` and `not_desk/` subfolders of photos.
    #[arg(long, env = "DESKGEN_EVAL_PHOTOS")]
    pub photos: PathBuf,
    /// Item labels: a JSON object from each photo's path under the folder to its item names
    /// (default: `labels.json` in the folder, if there is one; photos it does not list are
    /// labelled by the item names in their file names).
    #[arg(long, env = "DESKGEN_EVAL_LABELS")]
    pub labels: Option<PathBuf>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: crate::inference::RuntimeConfig,
    /// Vision models.
    #[command(flatten)]
    pub vision: crate::inference::vision::VisionConfig,
}

/// Settings of `deskgen models`.
#[derive(Debug, Clone, Args)]
pub struct ModelsCommand {
    /// Without one, list the loaded models.
    #[command(subcommand)]
    pub action: Option<ModelsAction>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: crate::inference::RuntimeConfig,
    /// Vision models.
    #[command(flatten)]
    pub vision: crate::inference::vision::VisionConfig,
    /// Stable Diffusion pipeline folder, or `hf:REPO[@REVISION][:SUBFOLDER]` to pull it from the
    /// hub first.
    #[arg(long, env = "DESKGEN_SD_MODEL", default_value = "onnx/fixtures/tiny-sd15")]
    pub sd_model: PathBuf,
}

/// What `deskgen models` does besides listing.
#[derive(Debug, Clone, Subcommand)]
pub enum ModelsAction {
    /// Fetch a Stable Diffusion pipeline in ONNX layout from the Hugging Face hub; print its folder.
    ///
    /// Files go into huggingface_hub's cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`); `HF_ENDPOINT`,
    /// `HF_TOKEN` and `HF_HUB_OFFLINE` are read as huggingface_hub reads them. The printed folder is
    /// what `--sd-model` takes.
    Pull(PullCommand),
}

/// Settings of `deskgen models pull`.
#[derive(Debug, Clone, Args)]
pub struct PullCommand {
    /// The hub repo, and a branch, tag or commit (default `main`).
    #[arg(value_name = "REPO[@REVISION]")]
    pub model: crate::hub::RepoRef,
    /// Only this folder of the repo (one holding `model_index.json`); the printed folder is it.
    #[arg(long, env = "DESKGEN_PULL_SUBFOLDER", value_name = "DIR")]
    pub subfolder: Option<String>,
}

/// Settings of `deskgen serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on for gRPC, grpc-web and REST.
    #[arg(long, env = "DESKGEN_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where tasks wait and results live: `memory` (embedded, under --data-dir) or a Redis URL
    /// (`redis://[:password@]host:port/db`, `rediss://` for TLS) shared by API nodes and workers.
    #[arg(long, env = "DESKGEN_QUEUE", default_value = "memory")]
    pub queue: QueueBackend,
    /// Most tasks waiting in the queue, across all nodes with Redis; more are refused with 429 /
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "DESKGEN_MAX_QUEUE_DEPTH", default_value_t = 100)]
    pub max_queue_depth: usize,
    /// With the Redis queue and `--workers 0`, the node loads no models and serves what the live
    /// workers announce; it is ready while at least this many are live.
    #[arg(long, env = "DESKGEN_MIN_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_workers: u64,
    /// Task store, workers, retries and lifetimes.
    #[command(flatten)]
    pub tasks: TaskConfig,
    /// API key clients must send as `Authorization: Bearer <key>` (repeatable; none = open API).
    #[arg(long = "api-key", env = "DESKGEN_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// File with one API key per line.
    #[arg(long, env = "DESKGEN_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Largest request body in bytes (REST JSON and gRPC messages).
    #[arg(long, env = "DESKGEN_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest photo a client may hand in, in bytes: an upload's body, a multipart file part, the
    /// decoded `initial_image` of a JSON body or a gRPC message's bytes.
    #[arg(long, env = "DESKGEN_MAX_UPLOAD_BYTES", default_value_t = 20_000_000)]
    pub max_upload_bytes: u64,
    /// Origins whose pages may call the API from a browser, as `scheme://host[:port]` (repeatable;
    /// `*` for any). The server's own origin always may. While no API key is configured, pages of
    /// any other origin may not submit or cancel.
    #[arg(long = "cors-allow-origin", env = "DESKGEN_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,
    /// Host names clients reach this server by, with or without a port (repeatable). With them,
    /// or on a loopback listener, a request naming any other `Host` is refused (DNS rebinding).
    #[arg(long = "public-host", env = "DESKGEN_PUBLIC_HOST", value_delimiter = ',')]
    pub public_hosts: Vec<String>,
    /// How long clients may take to send a request.
    #[command(flatten)]
    pub read_timeouts: ReadTimeouts,
    /// OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. http://127.0.0.1:4317
    /// (none: no traces).
    #[arg(long, env = "DESKGEN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Models, object store, photo fetching and shopping.
    #[command(flatten)]
    pub pipeline: PipelineConfig,
    /// Webhook delivery.
    #[command(flatten)]
    pub webhook: WebhookConfig,
}

/// Settings of `deskgen worker`: a GPU host that runs tasks from Redis and serves only health and
/// metrics.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    /// Address for `/healthcheck` and `/metrics`.
    #[arg(long, env = "DESKGEN_WORKER_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// The Redis queue shared with the API nodes (`redis://…` or `rediss://…`).
    #[arg(long, env = "DESKGEN_QUEUE")]
    pub queue: RedisUrl,
    /// Name in metrics and logs; unique per worker process (default: the host name).
    #[arg(long, env = "DESKGEN_WORKER_NAME")]
    pub name: Option<String>,
    /// OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. http://127.0.0.1:4317
    /// (none: no traces).
    #[arg(long, env = "DESKGEN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How long clients may take to send a request.
    #[command(flatten)]
    pub read_timeouts: ReadTimeouts,
    /// Task store, workers, retries and lifetimes.
    #[command(flatten)]
    pub tasks: TaskConfig,
    /// Models, object store, photo fetching and shopping.
    #[command(flatten)]
    pub pipeline: PipelineConfig,
    /// Webhook delivery.
    #[command(flatten)]
    pub webhook: WebhookConfig,
}

/// How a node keeps and runs tasks; the same for `serve` and `worker`.
#[derive(Debug, Clone, Args)]
pub struct TaskConfig {
    /// Folder for the embedded task store and for images with the file object store (shared by
    /// every node that serves them, or use S3).
    #[arg(long, env = "DESKGEN_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Tasks this process runs at once (`serve` with a Redis queue: 0 makes an API-only node).
    #[arg(long, env = "DESKGEN_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Starts a task gets when the process running it stops; after that it fails.
    #[arg(long, env = "DESKGEN_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Tasks of higher priority that may start while a lower level waits before a task of that
    /// level gets its turn (give every node the same).
    #[arg(long, env = "DESKGEN_STARVATION_BOUND", default_value_t = crate::tasks::schedule::DEFAULT_STARVATION_BOUND, value_parser = clap::value_parser!(u32).range(1..))]
    pub starvation_bound: u32,
    /// With Redis: how long a task may go without its worker's heartbeat before another worker
    /// takes it over.
    #[arg(long, env = "DESKGEN_VISIBILITY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub visibility_timeout: Duration,
    /// With Redis: how long a worker's consumer with no task pending may go without reading
    /// before any node removes it from the consumer group (a live worker comes back on its next
    /// read).
    #[arg(long, env = "DESKGEN_CONSUMER_EXPIRY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub consumer_expiry: Duration,
    /// How long finished results are kept (e.g. 7d, 12h).
    #[arg(long, env = "DESKGEN_RESULT_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub result_ttl: Duration,
    /// How long uploaded photos are kept in the file object store (with S3, a lifecycle rule on
    /// the `images/uploads/` prefix does this; see the README).
    #[arg(long, env = "DESKGEN_UPLOAD_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub upload_ttl: Duration,
    /// Longest a task may run before it fails with TIMEOUT.
    #[arg(long, env = "DESKGEN_TASK_DEADLINE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub task_deadline: Duration,
    /// On SIGTERM/Ctrl-C, how long running tasks may take to finish; those still running then run
    /// again at the next start (or, with Redis, are handed back to the queue at once).
    #[arg(long, env = "DESKGEN_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Which task queue backend a node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// In-process queue over the embedded store: one node does everything.
    Memory,
    /// Redis shared by any number of API nodes and workers.
    Redis(RedisUrl),
}

/// A Redis connection URL; shown without its password in logs and `--help`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

/// Why a queue setting did not parse.
#[derive(Debug, thiserror::Error)]
pub enum QueueUrlError {
    /// Neither `memory` nor a Redis URL.
    #[error("expected `memory` or a redis:// or rediss:// URL")]
    UnknownScheme,
    /// A Redis URL the client rejects.
    #[error("invalid Redis URL: {0}")]
    Invalid(String),
}

impl RedisUrl {
    /// The URL with its credentials, for connecting.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RedisUrl {
    type Err = QueueUrlError;

    fn from_str(s: &str) -> Result<RedisUrl, QueueUrlError> {
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(QueueUrlError::UnknownScheme);
        }
        redis::Client::open(s).map_err(|e| QueueUrlError::Invalid(e.to_string()))?;
        Ok(RedisUrl(s.to_string()))
    }
}

impl fmt::Display for RedisUrl {
    /// Scheme, host, port and database; never the user or password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("redis", &self.0));
        let without_credentials = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        write!(f, "{scheme}://{without_credentials}")
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

impl FromStr for QueueBackend {
    type Err = QueueUrlError;

    fn from_str(s: &str) -> Result<QueueBackend, QueueUrlError> {
        if s == "memory" { Ok(QueueBackend::Memory) } else { s.parse().map(QueueBackend::Redis) }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{QueueBackend, QueueUrlError, RedisUrl};

    #[test]
    fn every_flag_has_a_unique_name_and_an_env_var() {
        let cli = super::Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            for arg in
                sub.get_arguments().filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "json"))
            {
                assert!(
                    arg.get_env().is_some(),
                    "{} --{} has no env var",
                    sub.get_name(),
                    arg.get_long().unwrap()
                );
            }
        }
    }

    #[test]
    fn redis_urls_never_show_their_password() {
        let url: RedisUrl = "redis://:s3cret@cache.internal:6380/2".parse().unwrap();
        assert_eq!(url.to_string(), "redis://cache.internal:6380/2");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.as_str(), "redis://:s3cret@cache.internal:6380/2");
    }

    #[test]
    fn queue_backend_is_memory_or_a_redis_url() {
        assert_eq!("memory".parse::<QueueBackend>().unwrap(), QueueBackend::Memory);
        assert!(matches!("rediss://h:1/0".parse::<QueueBackend>().unwrap(), QueueBackend::Redis(_)));
        assert!(matches!("postgres://h".parse::<QueueBackend>(), Err(QueueUrlError::UnknownScheme)));
    }
}

/// How long a client may take to send a request; slower ones are cut off, so that connections
/// trickling bytes (slowloris) cannot pile up.
#[derive(Debug, Clone, Copy, Args)]
pub struct ReadTimeouts {
    /// Time to send a request's headers (HTTP/1.1); the connection is closed after it.
    #[arg(id = "header_read_timeout", long = "header-read-timeout", env = "DESKGEN_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub header: Duration,
    /// Time to send a request's whole body, counted from its headers; a body still arriving then
    /// is answered 408 `REQUEST_TIMEOUT` and the connection closed.
    #[arg(id = "body_read_timeout", long = "body-read-timeout", env = "DESKGEN_BODY_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub body: Duration,
}
