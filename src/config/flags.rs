//! The flags of the engine, the pipeline and the services it talks to. Each module takes a plain
//! config struct; here each gets the flags that fill it, so the command line stays in one place.
//! A config struct flattened into a command parses through its flags struct ([`parsed_by!`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::fetch::{AllowRule, DEFAULT_MAX_IMAGE_BYTES, FetchConfig};
use crate::inference::vision::ocr::DbSettings;
use crate::inference::vision::{OcrConfig, VisionConfig};
use crate::inference::{ArenaExtend, ConvAlgoSearch, ExecutionProvider, RuntimeConfig};
use crate::pipeline::{PipelineConfig, SdModelSpec};
use crate::shopping::{ApiSecret, NaverSort, ProviderChoice, ShoppingConfig};
use crate::storage::{DEFAULT_UPLOAD_ATTEMPTS, ObjectStoreKind, StorageConfig};
use crate::webhook::{WebhookConfig, WebhookSecret};

/// Makes a plain config struct flattenable into a command: clap parses `$flags`, which converts.
macro_rules! parsed_by {
    ($config:ty, $flags:ty) => {
        impl clap::FromArgMatches for $config {
            fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
                <$flags as clap::FromArgMatches>::from_arg_matches(matches).map(<$config>::from)
            }

            fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
                *self = <Self as clap::FromArgMatches>::from_arg_matches(matches)?;
                Ok(())
            }
        }

        impl clap::Args for $config {
            fn augment_args(command: clap::Command) -> clap::Command {
                <$flags as clap::Args>::augment_args(command)
            }

            fn augment_args_for_update(command: clap::Command) -> clap::Command {
                <$flags as clap::Args>::augment_args_for_update(command)
            }
        }
    };
}

/// Lets a plain enum be a flag's value: its names and the help for each.
macro_rules! value_enum {
    ($ty:ident { $($variant:ident => $name:literal : $help:literal),+ $(,)? }) => {
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($ty::$variant),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $($ty::$variant => clap::builder::PossibleValue::new($name).help($help)),+
                })
            }
        }
    };
}

value_enum!(ExecutionProvider {
    Cpu => "cpu": "ONNX Runtime's CPU kernels",
    Cuda => "cuda": "NVIDIA CUDA; fails at startup if it cannot be registered",
    Auto => "auto": "CUDA when it registers, otherwise CPU with a warning",
});

value_enum!(ConvAlgoSearch {
    Exhaustive => "exhaustive": "Benchmark every algorithm on the first run of each shape",
    Heuristic => "heuristic": "cuDNN's heuristics, no benchmarking",
    Default => "default": "Always implicit precomputed GEMM",
});

value_enum!(ArenaExtend {
    NextPowerOfTwo => "next-power-of-two": "Double the arena's chunks",
    SameAsRequested => "same-as-requested": "Grow by exactly what was asked for",
});

value_enum!(ObjectStoreKind {
    File => "file": "Files under <data-dir>/images, served by this server at /v1/images/",
    S3 => "s3": "An S3 bucket, or a bucket on an S3-compatible server",
});

value_enum!(ProviderChoice {
    Auto => "auto": "Naver when both API keys are set, otherwise the catalog",
    Naver => "naver": "The Naver Shopping search API (keys required)",
    Catalog => "catalog": "The catalog file",
});

/// Whether photos' text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcrSwitch {
    /// Read it; the three OCR files must be there.
    On,
    /// Do not read it.
    Off,
}

value_enum!(OcrSwitch {
    On => "on": "Read the text in photos; fails at startup if a model file is missing",
    Off => "off": "Do not read text",
});

value_enum!(NaverSort {
    Sim => "sim": "Relevance: the most relevant items, then the cheapest of them win",
    Asc => "asc": "Ascending price: cheapest first, relevance left to Naver's matching alone",
});

/// ONNX Runtime flags.
#[derive(Debug, Clone, Args)]
pub struct RuntimeFlags {
    /// Execution provider for all models: cpu, cuda (fail if unavailable) or auto (CUDA, else CPU).
    #[arg(long, env = "DESKGEN_EXECUTION_PROVIDER", value_enum, default_value = "cpu")]
    execution_provider: ExecutionProvider,
    /// CUDA device ordinal.
    #[arg(long, env = "DESKGEN_DEVICE_ID", default_value_t = 0)]
    device_id: i32,
    /// Threads each session uses inside one operator (0 = ONNX Runtime's choice).
    #[arg(long, env = "DESKGEN_INTRA_THREADS", default_value_t = 0)]
    intra_threads: usize,
    /// Sub-models that stay on the CPU when the provider is CUDA, e.g. `text_encoder,vae_encoder`.
    #[arg(long, env = "DESKGEN_CPU_MODELS", value_delimiter = ',')]
    cpu_models: Vec<String>,
    /// How CUDA picks cuDNN convolution algorithms: exhaustive (benchmarks each on the first run),
    /// heuristic, or default (no search; least memory).
    #[arg(long, env = "DESKGEN_CUDNN_CONV_ALGO_SEARCH", value_enum, default_value = "exhaustive")]
    cudnn_conv_algo_search: ConvAlgoSearch,
    /// Most bytes each CUDA session's memory arena may hold (0 = no limit).
    #[arg(long, env = "DESKGEN_GPU_MEM_LIMIT", default_value_t = 0)]
    gpu_mem_limit: usize,
    /// How a CUDA memory arena grows: next-power-of-two (fewer allocations) or same-as-requested
    /// (less memory held).
    #[arg(long, env = "DESKGEN_ARENA_EXTEND_STRATEGY", value_enum, default_value = "next-power-of-two")]
    arena_extend_strategy: ArenaExtend,
}

impl From<RuntimeFlags> for RuntimeConfig {
    fn from(f: RuntimeFlags) -> Self {
        RuntimeConfig {
            execution_provider: f.execution_provider,
            device_id: f.device_id,
            intra_threads: f.intra_threads,
            cpu_models: f.cpu_models,
            cudnn_conv_algo_search: f.cudnn_conv_algo_search,
            gpu_mem_limit: f.gpu_mem_limit,
            arena_extend_strategy: f.arena_extend_strategy,
        }
    }
}
parsed_by!(RuntimeConfig, RuntimeFlags);

/// Vision model flags.
#[derive(Debug, Clone, Args)]
pub struct VisionFlags {
    /// COCO object detector (SSD-MobileNet-v2 ONNX), built by `make models`.
    #[arg(long, env = "DESKGEN_DETECTOR", default_value = "assets/models/detector.onnx")]
    detector: PathBuf,
    /// Open Images v4 object detector (MediaPipe's SSD-MobileNetV2 as ONNX), built by `make models`.
    #[arg(long, env = "DESKGEN_OID_DETECTOR", default_value = "assets/models/oidv4_detector.onnx")]
    oid_detector: PathBuf,
    /// The Open Images detector's label map, one a line.
    #[arg(long, env = "DESKGEN_OID_LABELS", default_value = "assets/models/oidv4_labels.txt")]
    oid_labels: PathBuf,
    /// Open Images detections scoring below this (0..1) are ignored.
    #[arg(long, env = "DESKGEN_MIN_OID_SCORE", default_value_t = 0.4)]
    min_oid_score: f32,
    /// Besides the whole photo, both detectors look at a grid of this many overlapping tiles a
    /// side (0 or 1: the whole photo only; 3: nine tiles), for small things such as mugs and mice.
    #[arg(long, env = "DESKGEN_DETECTOR_TILES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=4))]
    detector_tiles: u32,
    /// ImageNet scene classifier (EfficientNet-Lite3 ONNX), built by `make models`.
    #[arg(long, env = "DESKGEN_CLASSIFIER", default_value = "assets/models/classifier.onnx")]
    classifier: PathBuf,
    /// The classifier's labels, one a line.
    #[arg(long, env = "DESKGEN_CLASSIFIER_LABELS", default_value = "assets/models/imagenet_labels.txt")]
    classifier_labels: PathBuf,
    /// Captioner directory in the optimum ONNX layout; without it captions are composed from detections.
    #[arg(long, env = "DESKGEN_CAPTIONER")]
    captioner: Option<PathBuf>,
    /// Beams for caption search (1 = greedy); defaults to the captioner's generation_config.json.
    #[arg(long, env = "DESKGEN_CAPTION_BEAMS")]
    caption_beams: Option<usize>,
    /// Most tokens a caption may have; defaults to the captioner's generation_config.json.
    #[arg(long, env = "DESKGEN_CAPTION_MAX_TOKENS")]
    caption_max_tokens: Option<usize>,
    /// Desk score (0..1) at or above which a photo counts as a desk.
    #[arg(long, env = "DESKGEN_DESK_THRESHOLD", default_value_t = 0.5)]
    desk_threshold: f32,
    /// Detections scoring below this (0..1) are ignored.
    #[arg(long, env = "DESKGEN_MIN_DETECTION_SCORE", default_value_t = 0.3)]
    min_detection_score: f32,
    /// ImageNet classes below this probability (0..1) do not count as items found.
    #[arg(long, env = "DESKGEN_MIN_CLASS_SCORE", default_value_t = 0.1)]
    min_class_score: f32,
    /// Largest photo accepted, in pixels (checked from the header, before decoding).
    #[arg(long, env = "DESKGEN_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    max_image_pixels: u64,
    /// Read the text in photos (PP-OCRv4) for brands and model names (default: on when the three
    /// OCR model files are present).
    #[arg(long, env = "DESKGEN_OCR", value_enum)]
    ocr: Option<OcrSwitch>,
    /// Text detection model (PP-OCRv4 DB), fetched by `make models`.
    #[arg(long, env = "DESKGEN_OCR_DETECTOR", default_value = "assets/models/ocr_det.onnx")]
    ocr_detector: PathBuf,
    /// Text orientation classifier (0 or 180 degrees), fetched by `make models`.
    #[arg(long, env = "DESKGEN_OCR_CLASSIFIER", default_value = "assets/models/ocr_cls.onnx")]
    ocr_classifier: PathBuf,
    /// Text recognition model (PP-OCRv4, CTC), fetched by `make models`.
    #[arg(long, env = "DESKGEN_OCR_RECOGNIZER", default_value = "assets/models/ocr_rec.onnx")]
    ocr_recognizer: PathBuf,
    /// Mean text probability (0..1) a detected line's box needs.
    #[arg(long, env = "DESKGEN_OCR_BOX_THRESHOLD", default_value_t = 0.5)]
    ocr_box_threshold: f32,
    /// Lines read with a lower mean character probability (0..1) are dropped.
    #[arg(long, env = "DESKGEN_OCR_MIN_SCORE", default_value_t = 0.5)]
    ocr_min_score: f32,
    /// Photos larger than this a side are scaled down before their text is looked for.
    #[arg(long, env = "DESKGEN_OCR_MAX_SIDE", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(64..=8192))]
    ocr_max_side: u32,
    /// Reading a photo's text stops after this long (the lines read by then are kept, with a warning).
    #[arg(long, env = "DESKGEN_OCR_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    ocr_timeout: Duration,
}

impl From<VisionFlags> for VisionConfig {
    fn from(f: VisionFlags) -> Self {
        let ocr = ocr_config(&f);
        VisionConfig {
            detector: f.detector,
            oid_detector: f.oid_detector,
            oid_labels: f.oid_labels,
            min_oid_score: f.min_oid_score,
            detector_tiles: f.detector_tiles,
            items: crate::inference::vision::ItemTable::builtin(),
            classifier: f.classifier,
            classifier_labels: f.classifier_labels,
            captioner: f.captioner,
            caption_beams: f.caption_beams,
            caption_max_tokens: f.caption_max_tokens,
            desk_threshold: f.desk_threshold,
            min_detection_score: f.min_detection_score,
            min_class_score: f.min_class_score,
            max_image_pixels: f.max_image_pixels,
            ocr,
        }
    }
}
parsed_by!(VisionConfig, VisionFlags);

/// The OCR settings, or none when `--ocr off`, or when it is not given and a model file is missing.
fn ocr_config(f: &VisionFlags) -> Option<OcrConfig> {
    let config = OcrConfig {
        detector: f.ocr_detector.clone(),
        classifier: f.ocr_classifier.clone(),
        recognizer: f.ocr_recognizer.clone(),
        db: DbSettings { box_threshold: f.ocr_box_threshold, ..DbSettings::default() },
        min_score: f.ocr_min_score,
        max_side: f.ocr_max_side,
        timeout: f.ocr_timeout,
    };
    match f.ocr {
        Some(OcrSwitch::On) => Some(config),
        Some(OcrSwitch::Off) => None,
        None => config.files_present().then_some(config),
    }
}

/// Object storage flags.
#[derive(Debug, Clone, Args)]
pub struct StorageFlags {
    /// Object store for generated images: file (under the data directory) or s3.
    #[arg(long = "object-store", env = "DESKGEN_OBJECT_STORE", value_enum, default_value = "file")]
    object_store: ObjectStoreKind,
    /// Base URL clients reach this server at; file-store image URLs start with it (default: the
    /// address `serve` listens on, with 127.0.0.1 for an unspecified address; http://127.0.0.1:8080
    /// for other commands).
    #[arg(long = "image-base-url", env = "DESKGEN_IMAGE_BASE_URL")]
    image_base_url: Option<String>,
    /// S3 bucket for generated images (required with --object-store s3).
    #[arg(long = "s3-bucket", env = "DESKGEN_S3_BUCKET")]
    s3_bucket: Option<String>,
    /// S3 region (default: from the AWS configuration chain, else us-east-1).
    #[arg(long = "s3-region", env = "DESKGEN_S3_REGION")]
    s3_region: Option<String>,
    /// Endpoint of an S3-compatible server, e.g. http://127.0.0.1:9000.
    #[arg(long = "s3-endpoint", env = "DESKGEN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Address buckets as endpoint/bucket/key instead of bucket.endpoint/key.
    #[arg(long = "s3-force-path-style", env = "DESKGEN_S3_FORCE_PATH_STYLE")]
    s3_force_path_style: bool,
    /// Public base URL of the bucket (a CDN, say); image URLs become <base>/<key>.
    #[arg(long = "s3-public-base-url", env = "DESKGEN_S3_PUBLIC_BASE_URL")]
    s3_public_base_url: Option<String>,
    /// Return presigned GET URLs valid this long (e.g. 1h, at most 7 days) instead of public URLs.
    #[arg(long = "s3-presign-ttl", env = "DESKGEN_S3_PRESIGN_TTL", value_parser = humantime::parse_duration)]
    s3_presign_ttl: Option<Duration>,
    /// Attempts per upload before it fails.
    #[arg(long = "s3-upload-attempts", env = "DESKGEN_S3_UPLOAD_ATTEMPTS", default_value_t = DEFAULT_UPLOAD_ATTEMPTS)]
    s3_upload_attempts: u32,
    /// Delay before the first upload retry; it doubles with every further attempt.
    #[arg(long = "s3-retry-backoff", env = "DESKGEN_S3_RETRY_BACKOFF", value_parser = humantime::parse_duration, default_value = "200ms")]
    s3_retry_backoff: Duration,
    /// Time allowed for one S3 request attempt.
    #[arg(long = "s3-timeout", env = "DESKGEN_S3_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    s3_timeout: Duration,
}

impl From<StorageFlags> for StorageConfig {
    fn from(f: StorageFlags) -> Self {
        StorageConfig {
            object_store: f.object_store,
            image_base_url: f.image_base_url,
            s3_bucket: f.s3_bucket,
            s3_region: f.s3_region,
            s3_endpoint: f.s3_endpoint,
            s3_force_path_style: f.s3_force_path_style,
            s3_public_base_url: f.s3_public_base_url,
            s3_presign_ttl: f.s3_presign_ttl,
            s3_upload_attempts: f.s3_upload_attempts,
            s3_retry_backoff: f.s3_retry_backoff,
            s3_timeout: f.s3_timeout,
        }
    }
}
parsed_by!(StorageConfig, StorageFlags);

/// Photo download flags.
#[derive(Debug, Clone, Args)]
pub struct FetchFlags {
    /// Allow plain http:// image and webhook URLs (https only otherwise).
    #[arg(long = "fetch-allow-http", env = "DESKGEN_FETCH_ALLOW_HTTP")]
    allow_http: bool,
    /// Host name, address or CIDR that may be reached although it is private (repeatable, or comma-separated).
    #[arg(long = "fetch-allow", env = "DESKGEN_FETCH_ALLOW", value_delimiter = ',')]
    allow: Vec<AllowRule>,
    /// Largest image download, in bytes; bigger bodies are cut off while streaming.
    #[arg(long, env = "DESKGEN_MAX_IMAGE_BYTES", default_value_t = DEFAULT_MAX_IMAGE_BYTES)]
    max_image_bytes: u64,
    /// Time allowed to open one connection (e.g. 5s).
    #[arg(long = "fetch-connect-timeout", env = "DESKGEN_FETCH_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    connect_timeout: Duration,
    /// Time allowed for a whole download, redirects and body included (e.g. 30s).
    #[arg(id = "fetch_timeout", long = "fetch-timeout", env = "DESKGEN_FETCH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Redirects followed before giving up.
    #[arg(long = "fetch-max-redirects", env = "DESKGEN_FETCH_MAX_REDIRECTS", default_value_t = 3)]
    max_redirects: usize,
}

impl From<FetchFlags> for FetchConfig {
    fn from(f: FetchFlags) -> Self {
        FetchConfig {
            allow_http: f.allow_http,
            allow: f.allow,
            max_image_bytes: f.max_image_bytes,
            connect_timeout: f.connect_timeout,
            timeout: f.timeout,
            max_redirects: f.max_redirects,
        }
    }
}
parsed_by!(FetchConfig, FetchFlags);

/// Shopping provider flags.
#[derive(Debug, Clone, Args)]
pub struct ShoppingFlags {
    /// Shopping source: auto (Naver when NAVER_CLIENT_ID and NAVER_CLIENT_SECRET are set, else the catalog), naver or catalog.
    #[arg(long = "shopping-provider", env = "DESKGEN_SHOPPING_PROVIDER", value_enum, default_value = "auto")]
    provider: ProviderChoice,
    /// Catalog JSON file (default: the built-in sample catalog).
    #[arg(long = "shopping-catalog", env = "DESKGEN_SHOPPING_CATALOG")]
    catalog: Option<PathBuf>,
    /// Naver Open API client id.
    #[arg(long = "naver-client-id", env = "NAVER_CLIENT_ID", hide_env_values = true)]
    naver_client_id: Option<String>,
    /// Naver Open API client secret.
    #[arg(long = "naver-client-secret", env = "NAVER_CLIENT_SECRET", hide_env_values = true)]
    naver_client_secret: Option<ApiSecret>,
    /// Base URL of the Naver Open API.
    #[arg(
        long = "naver-base-url",
        env = "DESKGEN_NAVER_BASE_URL",
        default_value = "https://openapi.naver.com"
    )]
    naver_base_url: String,
    /// Order Naver returns candidates in before they are re-sorted by price: sim or asc.
    #[arg(long = "naver-sort", env = "DESKGEN_NAVER_SORT", value_enum, default_value = "sim")]
    naver_sort: NaverSort,
    /// Candidates asked for per query (at most 100); the cheapest relevant ones are returned.
    #[arg(long = "naver-candidates", env = "DESKGEN_NAVER_CANDIDATES", default_value_t = 40)]
    naver_candidates: usize,
    /// Most Naver requests per second from this process.
    #[arg(long = "naver-qps", env = "DESKGEN_NAVER_QPS", default_value_t = 8.0)]
    naver_qps: f64,
    /// How long a query's results are reused.
    #[arg(long = "naver-cache-ttl", env = "DESKGEN_NAVER_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "1h")]
    naver_cache_ttl: Duration,
    /// Time allowed for one Naver request.
    #[arg(long = "naver-timeout", env = "DESKGEN_NAVER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    naver_timeout: Duration,
    /// Attempts per query when Naver fails with 5xx or times out.
    #[arg(long = "naver-attempts", env = "DESKGEN_NAVER_ATTEMPTS", default_value_t = 3)]
    naver_attempts: u32,
    /// Delay before the first retry; it doubles with every further attempt (with jitter).
    #[arg(long = "naver-retry-backoff", env = "DESKGEN_NAVER_RETRY_BACKOFF", value_parser = humantime::parse_duration, default_value = "200ms")]
    naver_retry_backoff: Duration,
}

impl From<ShoppingFlags> for ShoppingConfig {
    fn from(f: ShoppingFlags) -> Self {
        ShoppingConfig {
            provider: f.provider,
            catalog: f.catalog,
            naver_client_id: f.naver_client_id,
            naver_client_secret: f.naver_client_secret,
            naver_base_url: f.naver_base_url,
            naver_sort: f.naver_sort,
            naver_candidates: f.naver_candidates,
            naver_qps: f.naver_qps,
            naver_cache_ttl: f.naver_cache_ttl,
            naver_timeout: f.naver_timeout,
            naver_attempts: f.naver_attempts,
            naver_retry_backoff: f.naver_retry_backoff,
        }
    }
}
parsed_by!(ShoppingConfig, ShoppingFlags);

/// Webhook delivery flags.
#[derive(Debug, Clone, Args)]
pub struct WebhookFlags {
    /// Signing secret(s), `whsec_<base64>`; comma-separated or repeated, every one signs (key rotation).
    #[arg(
        long = "webhook-secret",
        env = "DESKGEN_WEBHOOK_SECRET",
        value_delimiter = ',',
        hide_env_values = true
    )]
    secrets: Vec<WebhookSecret>,
    /// Delays before each retry, comma-separated; its length is the number of retries.
    #[arg(long = "webhook-retry-schedule", env = "DESKGEN_WEBHOOK_RETRY_SCHEDULE", value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "1s,5s,30s,2m,10m")]
    retry_schedule: Vec<Duration>,
    /// Time allowed for one delivery attempt.
    #[arg(id = "webhook_timeout", long = "webhook-timeout", env = "DESKGEN_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "15s")]
    timeout: Duration,
    /// Most deliveries pending at once (queued or waiting to retry); more are refused.
    #[arg(long = "webhook-queue-capacity", env = "DESKGEN_WEBHOOK_QUEUE_CAPACITY", default_value_t = 1024)]
    queue_capacity: usize,
    /// Most delivery attempts in flight at once.
    #[arg(long = "webhook-concurrency", env = "DESKGEN_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
}

impl From<WebhookFlags> for WebhookConfig {
    fn from(f: WebhookFlags) -> Self {
        WebhookConfig {
            secrets: f.secrets,
            retry_schedule: f.retry_schedule,
            timeout: f.timeout,
            queue_capacity: f.queue_capacity,
            concurrency: f.concurrency,
        }
    }
}
parsed_by!(WebhookConfig, WebhookFlags);

/// Pipeline flags: the models, and the services the pipeline talks to.
#[derive(Debug, Clone, Args)]
pub struct PipelineFlags {
    /// ONNX Runtime settings.
    #[command(flatten)]
    runtime: RuntimeConfig,
    /// Vision models.
    #[command(flatten)]
    vision: VisionConfig,
    /// A Stable Diffusion model requests may name: a folder in optimum's ONNX layout, or
    /// `hf:REPO[@REVISION][:SUBFOLDER]` to pull one from the Hugging Face hub while the node starts,
    /// as NAME=… or named after its folder or repo. Repeat for several; the first is the default
    /// (the default is a tiny random-weight pipeline whose images are noise; see README for real
    /// weights).
    #[arg(
        long = "sd-model",
        env = "DESKGEN_SD_MODEL",
        value_delimiter = ',',
        value_name = "[NAME=]DIR|hf:REPO",
        default_value = "onnx/fixtures/tiny-sd15"
    )]
    sd_models: Vec<SdModelSpec>,
    /// How many Stable Diffusion models stay in memory at most (0: all). The others load when a
    /// request names one, in place of the least recently used.
    #[arg(long, env = "DESKGEN_MAX_LOADED_MODELS", default_value_t = 0)]
    max_loaded_models: usize,
    /// Folder of LoRA adapters (`*.safetensors`, diffusers/peft or kohya format, trigger words in
    /// `<name>.json` / `<name>.txt`) that requests may name; files that do not fit the model are
    /// skipped with a warning.
    #[arg(long, env = "DESKGEN_LORA_DIR", default_value = "onnx/loras")]
    lora_dir: PathBuf,
    /// How many merged UNet/text-encoder session sets (one per distinct set of LoRA names and
    /// weights) are kept for reuse; each holds a copy of the models it changes. 0 merges per request.
    #[arg(long, env = "DESKGEN_LORA_CACHE_SIZE", default_value_t = 2)]
    lora_cache_size: usize,
    /// Largest |weight| a request may give one LoRA adapter (negative weights down to -this work).
    #[arg(long, env = "DESKGEN_MAX_LORA_WEIGHT", default_value_t = 2.0)]
    max_lora_weight: f32,
    /// A ControlNet of the default model besides those in its folder's `controlnet/<type>/`, as
    /// TYPE=DIR (DIR holds model.onnx, exported by onnx/export_controlnet.py); repeat for several.
    /// Needs the model's residual-input UNet (`unet_controlnet/`); one that does not fit the model
    /// stops start-up.
    #[arg(long = "controlnet", env = "DESKGEN_CONTROLNETS", value_delimiter = ',', value_parser = parse_controlnet)]
    controlnets: Vec<(String, PathBuf)>,
    /// A TAESD-style tiny decoder (ONNX: DIR/model.onnx, or an optimum export's DIR/vae_decoder/)
    /// that draws the default model's previews instead of the linear latent map; a model folder's
    /// own `preview_decoder/` does the same for that model.
    #[arg(long, env = "DESKGEN_PREVIEW_DECODER")]
    preview_decoder: Option<PathBuf>,
    /// HED soft-edge model (ONNX, built by `make models`), which makes "softedge" control images
    /// from the photo; without the file, softedge units need their own image_url.
    #[arg(long, env = "DESKGEN_HED_MODEL", default_value = crate::inference::vision::DEFAULT_HED_MODEL)]
    hed_model: PathBuf,
    /// Largest image side in pixels: what a request may ask for, and the bound of the size a photo's
    /// shape gives.
    #[arg(long, env = "DESKGEN_MAX_SIDE", default_value_t = 2048)]
    max_side: u32,
    /// Most images one request may ask for with `num_images` (1 to 4); they run as one UNet batch.
    #[arg(long, env = "DESKGEN_MAX_IMAGES", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4))]
    max_images: u32,
    /// Category table and prompt templates (TOML); the built-in config/pipeline.toml when unset.
    #[arg(long, env = "DESKGEN_PIPELINE_CONFIG")]
    pipeline_config: Option<PathBuf>,
    /// Object storage for generated images.
    #[command(flatten)]
    storage: StorageConfig,
    /// Downloading users' photos.
    #[command(flatten)]
    fetch: FetchConfig,
    /// Shopping offers.
    #[command(flatten)]
    shopping: ShoppingConfig,
}

/// `TYPE=DIR` of `--controlnet`.
fn parse_controlnet(spec: &str) -> Result<(String, PathBuf), String> {
    match spec.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("expected TYPE=DIR (e.g. canny=models/controlnet-canny), got {spec:?}")),
    }
}

impl From<PipelineFlags> for PipelineConfig {
    fn from(f: PipelineFlags) -> Self {
        PipelineConfig {
            runtime: f.runtime,
            vision: f.vision,
            sd_models: f.sd_models,
            max_loaded_models: f.max_loaded_models,
            lora_dir: f.lora_dir,
            lora_cache_size: f.lora_cache_size,
            max_lora_weight: f.max_lora_weight,
            controlnets: f.controlnets,
            preview_decoder: f.preview_decoder,
            hed_model: f.hed_model,
            max_side: f.max_side,
            max_images: f.max_images,
            pipeline_config: f.pipeline_config,
            storage: f.storage,
            fetch: f.fetch,
            shopping: f.shopping,
        }
    }
}
parsed_by!(PipelineConfig, PipelineFlags);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        pipeline: PipelineConfig,
        #[command(flatten)]
        webhook: WebhookConfig,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["deskgen"].iter().chain(args))
    }

    #[test]
    fn defaults_match_the_plain_configs() {
        Cli::command().debug_assert();
        let cli = parse(&[]).unwrap();
        let defaults = (
            RuntimeConfig::default(),
            VisionConfig::default(),
            StorageConfig::default(),
            FetchConfig::default(),
            ShoppingConfig::default(),
            WebhookConfig::default(),
        );
        assert_eq!(format!("{:?}", cli.pipeline.runtime), format!("{:?}", defaults.0));
        assert_eq!(format!("{:?}", cli.pipeline.vision), format!("{:?}", defaults.1));
        assert_eq!(format!("{:?}", cli.pipeline.storage), format!("{:?}", defaults.2));
        assert_eq!(format!("{:?}", cli.pipeline.fetch), format!("{:?}", defaults.3));
        assert_eq!(format!("{:?}", cli.pipeline.shopping), format!("{:?}", defaults.4));
        assert_eq!(format!("{:?}", cli.webhook), format!("{:?}", defaults.5));
    }

    #[test]
    fn ocr_is_on_when_its_files_are_there_unless_switched() {
        let ocr = |args: &[&str]| parse(args).unwrap().pipeline.vision.ocr;
        assert!(ocr(&["--ocr", "off"]).is_none());
        assert!(ocr(&["--ocr-detector", "/no/such/det.onnx"]).is_none(), "files missing, not asked for");
        let asked =
            ocr(&["--ocr", "on", "--ocr-detector", "/no/such/det.onnx", "--ocr-max-side", "1024"]).unwrap();
        assert_eq!((asked.detector, asked.max_side), (PathBuf::from("/no/such/det.onnx"), 1024));
        assert!(parse(&["--ocr", "maybe"]).is_err());
    }

    #[test]
    fn storage_flags_parse() {
        let cli = parse(&[
            "--object-store",
            "s3",
            "--s3-bucket",
            "desk-bucket",
            "--s3-force-path-style",
            "--s3-presign-ttl",
            "1h",
        ])
        .unwrap();
        let storage = cli.pipeline.storage;
        assert_eq!(storage.object_store, ObjectStoreKind::S3);
        assert_eq!(storage.s3_bucket.as_deref(), Some("desk-bucket"));
        assert!(storage.s3_force_path_style);
        assert_eq!(storage.s3_presign_ttl, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn fetch_flags_parse() {
        let cli = parse(&[
            "--fetch-allow",
            "127.0.0.1,localhost",
            "--fetch-allow",
            "10.0.0.0/8",
            "--fetch-allow-http",
            "--fetch-timeout",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(cli.pipeline.fetch.allow.len(), 3);
        assert!(cli.pipeline.fetch.allow_http);
        assert_eq!(cli.pipeline.fetch.timeout, Duration::from_millis(1500));
        assert!(parse(&["--fetch-allow", "not a host"]).is_err());
    }

    #[test]
    fn webhook_flags_parse() {
        let cli = parse(&["--webhook-secret", "whsec_c2VjcmV0,whsec_b2xk"]).unwrap();
        assert_eq!(cli.webhook.secrets.len(), 2);
        assert_eq!(cli.webhook.retry_schedule, WebhookConfig::default().retry_schedule);
        let cli = parse(&["--webhook-retry-schedule", "10ms,1s"]).unwrap();
        assert_eq!(cli.webhook.retry_schedule, [Duration::from_millis(10), Duration::from_secs(1)]);
    }

    #[test]
    fn shopping_flags_parse() {
        let cli = parse(&["--naver-sort", "asc", "--naver-qps", "2.5", "--naver-cache-ttl", "10m"]).unwrap();
        assert_eq!(cli.pipeline.shopping.naver_sort, NaverSort::Asc);
        assert_eq!(cli.pipeline.shopping.naver_qps, 2.5);
        assert_eq!(cli.pipeline.shopping.naver_cache_ttl, Duration::from_secs(600));
    }

    #[test]
    fn enum_flags_take_their_documented_names() {
        let cli =
            parse(&["--execution-provider", "auto", "--arena-extend-strategy", "same-as-requested"]).unwrap();
        assert_eq!(cli.pipeline.runtime.execution_provider, ExecutionProvider::Auto);
        assert_eq!(cli.pipeline.runtime.arena_extend_strategy, ArenaExtend::SameAsRequested);
        let refused = parse(&["--execution-provider", "tpu"]).err().unwrap().to_string();
        assert!(refused.contains("cpu") && refused.contains("cuda"), "{refused}");
    }
}
