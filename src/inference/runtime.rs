//! ONNX Runtime: loading the shared library, choosing the execution provider, building sessions.
//!
//! The runtime library is loaded at run time (`ort`'s `load-dynamic`), so a missing library is an
//! error the service reports with the command that fetches it, never a panic.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::DynValue;

/// Errors while loading the runtime or building a session.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The shared library could not be found or loaded.
    #[error(
        "cannot load ONNX Runtime from {path}: {reason}. Fetch it with `make ort` \
         (onnx/fetch_ort.sh) or point ORT_DYLIB_PATH at libonnxruntime.so"
    )]
    Library {
        /// Where the library was looked for.
        path: String,
        /// The loader's message.
        reason: String,
    },
    /// The execution provider asked for could not be registered.
    #[error("execution provider {provider} is unavailable: {reason}")]
    Provider {
        /// The provider's name.
        provider: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
    /// A model file is missing or ONNX Runtime refused it.
    #[error("cannot load model {path}: {reason}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// New values for some initializers of a model file (see [`Runtime::session_with_overrides`]).
#[derive(Debug, Default)]
pub struct InitializerOverrides {
    /// (byte offset in the model file, bytes of the same length to put there) for values stored in
    /// the file itself.
    pub patches: Vec<(u64, Vec<u8>)>,
    /// (initializer name, value) for values kept in external data files.
    pub external: Vec<(String, DynValue)>,
}

/// Which execution provider sessions run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU kernels.
    Cpu,
    /// NVIDIA CUDA; fails at startup if it cannot be registered.
    Cuda,
    /// CUDA when it registers, otherwise CPU with a warning.
    Auto,
}

impl ExecutionProvider {
    /// The name reported by `/info` and `deskgen models`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::Auto => "auto",
        }
    }
}

/// Settings every session is built with.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Execution provider for all models: cpu, cuda (fail if unavailable) or auto (CUDA, else CPU).
    pub execution_provider: ExecutionProvider,
    /// CUDA device ordinal.
    pub device_id: i32,
    /// Threads each session uses inside one operator (0 = ONNX Runtime's choice).
    pub intra_threads: usize,
    /// Sub-models that stay on the CPU when the provider is CUDA, e.g. `text_encoder,vae_encoder`.
    pub cpu_models: Vec<String>,
    /// How CUDA picks cuDNN convolution algorithms: exhaustive (benchmarks each on the first run),
    /// heuristic, or default (no search; least memory).
    pub cudnn_conv_algo_search: ConvAlgoSearch,
    /// Most bytes each CUDA session's memory arena may hold (0 = no limit).
    pub gpu_mem_limit: usize,
    /// How a CUDA memory arena grows: next-power-of-two (fewer allocations) or same-as-requested
    /// (less memory held).
    pub arena_extend_strategy: ArenaExtend,
}

/// cuDNN convolution algorithm search (ONNX Runtime's `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgoSearch {
    /// Benchmark every algorithm on the first run of each shape.
    Exhaustive,
    /// cuDNN's heuristics, no benchmarking.
    Heuristic,
    /// Always implicit precomputed GEMM.
    Default,
}

/// Growth of a CUDA memory arena (ONNX Runtime's `arena_extend_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaExtend {
    /// Double the arena's chunks.
    NextPowerOfTwo,
    /// Grow by exactly what was asked for.
    SameAsRequested,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            execution_provider: ExecutionProvider::Cpu,
            device_id: 0,
            intra_threads: 0,
            cpu_models: Vec::new(),
            cudnn_conv_algo_search: ConvAlgoSearch::Exhaustive,
            gpu_mem_limit: 0,
            arena_extend_strategy: ArenaExtend::NextPowerOfTwo,
        }
    }
}

/// A loaded ONNX Runtime plus the settings sessions are built with. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    env: Environment,
    config: RuntimeConfig,
    /// The provider sessions actually run on after `auto` was resolved.
    active: ExecutionProvider,
    /// Whether a session's intra-op threads spin while waiting for work (ONNX Runtime's default).
    spinning: bool,
}

/// ONNX Runtime allows one environment per process; every `Runtime` shares it.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// `ORT_DYLIB_PATH`, else the library `make ort` links under `assets/lib`, else the system's.
fn library_path() -> String {
    if let Ok(path) = std::env::var("ORT_DYLIB_PATH") {
        return path;
    }
    let fetched = Path::new("assets/lib/libonnxruntime.so");
    if fetched.exists() { fetched.display().to_string() } else { "libonnxruntime.so".to_string() }
}

fn environment() -> Result<Environment, RuntimeError> {
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let path = library_path();
    let env = ENVIRONMENT.get_or_init(|| {
        if path.contains('/') && !Path::new(&path).exists() {
            return Err("no such file".to_string());
        }
        ort::init_from(&path)
            .map_err(|e| e.to_string())?
            .with_name("deskgen")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    env.clone().map_err(|reason| RuntimeError::Library { path, reason })
}

impl Runtime {
    /// Loads the library and checks that the chosen execution provider can be used.
    pub fn init(config: &RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let env = environment()?;
        let active = match config.execution_provider {
            ExecutionProvider::Cpu => ExecutionProvider::Cpu,
            ExecutionProvider::Cuda => {
                cuda_available()?;
                ExecutionProvider::Cuda
            }
            ExecutionProvider::Auto => match cuda_available() {
                Ok(()) => ExecutionProvider::Cuda,
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA unavailable, running on CPU");
                    ExecutionProvider::Cpu
                }
            },
        };
        Ok(Runtime { env, config: config.clone(), active, spinning: true })
    }

    /// The provider sessions run on (`auto` resolved).
    pub fn provider(&self) -> ExecutionProvider {
        self.active
    }

    /// The CUDA device sessions run on, when the provider is CUDA.
    pub fn cuda_device(&self) -> Option<i32> {
        (self.active == ExecutionProvider::Cuda).then_some(self.config.device_id)
    }

    /// This runtime for sub-model `model`: on the CPU when `--cpu-models` names it.
    pub fn for_model(&self, model: &str) -> Runtime {
        let mut runtime = self.clone();
        if self.config.cpu_models.iter().any(|m| m == model) {
            runtime.active = ExecutionProvider::Cpu;
        }
        runtime
    }

    /// This runtime for sessions that run in turn with others every step (a ControlNet and the
    /// UNet it feeds): their threads do not spin after a run, where on a few cores they would take
    /// the CPU from the next session (2.3x slower steps on 2 cores otherwise).
    pub fn taking_turns(&self) -> Runtime {
        Runtime { spinning: false, ..self.clone() }
    }

    /// A session builder with this runtime's threads, optimisation level and provider.
    pub fn builder(&self) -> Result<SessionBuilder, RuntimeError> {
        let fail = |reason: String| RuntimeError::Provider { provider: self.active.as_str(), reason };
        let mut builder = Session::builder(&self.env)
            .map_err(|e| fail(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| fail(e.to_string()))?;
        if self.config.intra_threads > 0 {
            builder =
                builder.with_intra_threads(self.config.intra_threads).map_err(|e| fail(e.to_string()))?;
        }
        if !self.spinning {
            builder = builder.with_intra_op_spinning(false).map_err(|e| fail(e.to_string()))?;
        }
        if self.active == ExecutionProvider::Cuda {
            builder = with_cuda(builder, &self.config).map_err(fail)?;
        }
        Ok(builder)
    }

    /// Builds a session from a model file, naming the file in any error.
    pub fn session(&self, path: &Path) -> Result<Session, RuntimeError> {
        self.session_with_overrides(path, InitializerOverrides::default())
    }

    /// Builds a session from a model file with some initializer values replaced; the file stays
    /// untouched. Values stored in the file are patched into a copy of its bytes; values in
    /// external data files are handed over with `AddExternalInitializers`. Both take effect before
    /// graph optimization (`AddInitializer` would not: optimizations that rewrite weights, such as
    /// the NCHWc Conv layout, would still read the file's values).
    pub fn session_with_overrides(
        &self,
        path: &Path,
        overrides: InitializerOverrides,
    ) -> Result<Session, RuntimeError> {
        let fail = |reason: String| RuntimeError::Model { path: path.to_path_buf(), reason };
        if !path.is_file() {
            return Err(fail("file not found".into()));
        }
        let mut builder = self.builder()?;
        for (name, value) in overrides.external {
            builder = builder
                .with_external_initializer(&name, value)
                .map_err(|e| fail(format!("cannot override initializer {name:?}: {e}")))?;
        }
        if overrides.patches.is_empty() {
            return builder.commit_from_file(path).map_err(|e| fail(e.to_string()));
        }
        let mut bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        for (offset, patch) in &overrides.patches {
            let range = *offset as usize..*offset as usize + patch.len();
            bytes
                .get_mut(range)
                .ok_or_else(|| fail(format!("patch at byte {offset} is outside the file")))?
                .copy_from_slice(patch);
        }
        // Loaded from memory, the model finds its external data files by this folder.
        let folder = path.parent().unwrap_or(Path::new(".")).to_string_lossy().into_owned();
        builder = builder
            .with_config_entry("session.model_external_initializers_file_folder_path", folder)
            .map_err(|e| fail(e.to_string()))?;
        builder.commit_from_memory(&bytes).map_err(|e| fail(e.to_string()))
    }
}

#[cfg(feature = "cuda")]
fn with_cuda(builder: SessionBuilder, config: &RuntimeConfig) -> Result<SessionBuilder, String> {
    use ort::ep::ArenaExtendStrategy;
    use ort::ep::cuda::ConvAlgorithmSearch;
    let search = match config.cudnn_conv_algo_search {
        ConvAlgoSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
        ConvAlgoSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
        ConvAlgoSearch::Default => ConvAlgorithmSearch::Default,
    };
    let strategy = match config.arena_extend_strategy {
        ArenaExtend::NextPowerOfTwo => ArenaExtendStrategy::NextPowerOfTwo,
        ArenaExtend::SameAsRequested => ArenaExtendStrategy::SameAsRequested,
    };
    let mut cuda = ort::ep::CUDA::default()
        .with_device_id(config.device_id)
        .with_conv_algorithm_search(search)
        .with_arena_extend_strategy(strategy);
    if config.gpu_mem_limit > 0 {
        cuda = cuda.with_memory_limit(config.gpu_mem_limit);
    }
    builder.with_execution_providers([cuda.build().error_on_failure()]).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(_builder: SessionBuilder, _config: &RuntimeConfig) -> Result<SessionBuilder, String> {
    Err("this binary was built without the `cuda` feature".to_string())
}

/// The provider libraries the onnxruntime-gpu package puts next to the core library.
#[cfg(feature = "cuda")]
const PROVIDER_LIBRARIES: [&str; 2] =
    ["libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"];

/// The libraries in `names` that `load` cannot load (by file name, through the loader's search path).
#[cfg(feature = "cuda")]
fn missing_libraries<'a>(names: &[&'a str], mut load: impl FnMut(&str) -> bool) -> Vec<&'a str> {
    names.iter().copied().filter(|name| !load(name)).collect()
}

/// What is missing for the CUDA provider and how to install it; `None` when nothing is.
#[cfg(feature = "cuda")]
fn missing_cuda_message(providers: &[&str], cuda: &[&str], core_library: &str) -> Option<String> {
    let mut parts = Vec::new();
    if !providers.is_empty() {
        parts.push(format!(
            "{} not next to {core_library} (fetch the GPU build with \
             `ORT_PKG=onnxruntime-gpu make ort`, which links them there)",
            providers.join(", ")
        ));
    }
    if !cuda.is_empty() {
        parts.push(format!(
            "cannot load {} (CUDA 13 and cuDNN 9: `pip install nvidia-cuda-runtime nvidia-cublas \
             nvidia-cufft nvidia-curand nvidia-cuda-nvrtc nvidia-cudnn-cu13` and add each package's \
             lib folder to LD_LIBRARY_PATH, or install NVIDIA's cuda-libraries-13-0 and libcudnn9-cuda-13 \
             packages)",
            cuda.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(feature = "cuda")]
fn cuda_available() -> Result<(), RuntimeError> {
    use ort::ep::ExecutionProvider as _;
    let library = library_path();
    // A bare file name is found through the loader's search path, and so are the providers then.
    let core_dir = Path::new(&library).parent().filter(|d| !d.as_os_str().is_empty());
    let providers = match core_dir {
        Some(dir) => missing_libraries(&PROVIDER_LIBRARIES, |name| dir.join(name).is_file()),
        None => Vec::new(),
    };
    // cuDNN's own parts (libcudnn_*.so.9) are loaded by libcudnn itself when first needed.
    let wanted: Vec<&str> =
        ort::ep::cuda::CUDA_DYLIBS.iter().chain(&ort::ep::cuda::CUDNN_DYLIBS[..1]).copied().collect();
    // Loaded libraries stay loaded: the CUDA provider loads the same ones moments later.
    let cuda = missing_libraries(&wanted, |name| ort::util::preload_dylib(name).is_ok());
    if let Some(reason) = missing_cuda_message(&providers, &cuda, &library) {
        return Err(RuntimeError::Provider { provider: "cuda", reason });
    }
    let reason = match ort::ep::CUDA::is_available() {
        Ok(true) => return Ok(()),
        Ok(false) => {
            "the runtime library has no CUDA provider (fetch it with ORT_PKG=onnxruntime-gpu make ort)".into()
        }
        Err(e) => e.to_string(),
    };
    Err(RuntimeError::Provider { provider: "cuda", reason })
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> Result<(), RuntimeError> {
    Err(RuntimeError::Provider {
        provider: "cuda",
        reason: "this binary was built without the `cuda` feature (cargo build --features cuda)".into(),
    })
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    #[test]
    fn lists_each_missing_library_with_how_to_install_it() {
        let cuda =
            missing_libraries(&["libcudart.so.13", "libcudnn.so.9"], |name| name.starts_with("libcudart"));
        assert_eq!(cuda, ["libcudnn.so.9"]);
        let message =
            missing_cuda_message(&["libonnxruntime_providers_cuda.so"], &cuda, "lib/libonnxruntime.so")
                .expect("something is missing");
        assert!(message.contains("libonnxruntime_providers_cuda.so not next to lib/libonnxruntime.so"));
        assert!(message.contains("ORT_PKG=onnxruntime-gpu"));
        assert!(message.contains("cannot load libcudnn.so.9"));
        assert!(message.contains("nvidia-cudnn-cu13"));
        assert_eq!(missing_cuda_message(&[], &[], "lib/libonnxruntime.so"), None);
    }

    #[test]
    fn cpu_models_stay_on_the_cpu() {
        let runtime = Runtime {
            env: environment().expect("the runtime library loads"),
            config: RuntimeConfig { cpu_models: vec!["text_encoder".into()], ..RuntimeConfig::default() },
            active: ExecutionProvider::Cuda,
        };
        assert_eq!(runtime.for_model("text_encoder").provider(), ExecutionProvider::Cpu);
        assert_eq!(runtime.for_model("unet").provider(), ExecutionProvider::Cuda);
        assert_eq!(runtime.for_model("unet").cuda_device(), Some(0));
    }
}
