//! Stable Diffusion pipelines in ONNX layout from the Hugging Face hub, kept in the cache that
//! Python's `huggingface_hub` uses, so that each reuses the other's downloads.
//!
//! [`pull`] lists a revision's files, keeps those the ONNX layout needs, and fetches each into
//! `blobs/` (resuming a partial download, checking an LFS file's sha256) behind a relative link in
//! `snapshots/{commit}/`; `refs/{revision}` records the commit. Offline, the revision is resolved
//! from the cache alone.

mod cache;
mod client;
mod progress;
mod select;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use futures::{StreamExt, TryStreamExt};

use crate::inference::diffusion::{DEFAULTS_FILE, ModelDefaults};
use cache::RepoCache;
use client::{FileMeta, HubClient};
pub use progress::{Downloads, PlannedFile, PullObserver, PullReport, PullStatus};

/// What `--sd-model` starts with to name a hub repo instead of a folder: `hf:REPO[@REVISION]`.
pub const MODEL_PREFIX: &str = "hf:";

/// Files fetched at once.
const PARALLEL_FILES: usize = 4;

/// Where the hub is and how to talk to it; [`HubSettings::from_env`] reads what
/// `huggingface_hub` reads.
#[derive(Clone)]
pub struct HubSettings {
    /// Base URL of the hub, without a trailing slash.
    pub endpoint: String,
    /// Access token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// The hub cache folder (holding `models--{org}--{name}/`).
    pub cache_dir: PathBuf,
    /// Use only the cache; never touch the network.
    pub offline: bool,
}

impl HubSettings {
    /// The public hub.
    pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

    /// `HF_ENDPOINT`, `HF_TOKEN` (else the token file `hf auth login` writes), `HF_HUB_CACHE`
    /// (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) and `HF_HUB_OFFLINE`.
    pub fn from_env() -> HubSettings {
        HubSettings::from_vars(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubSettings {
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(var("HOME").unwrap_or_default()).join(".cache"));
            cache.join("huggingface")
        });
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
        let saved_token = || std::fs::read_to_string(token_file).ok().map(|t| t.trim().to_string());
        HubSettings {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| HubSettings::DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            token: var("HF_TOKEN").or_else(saved_token).filter(|t| !t.is_empty()),
            cache_dir: var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub")),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
        }
    }
}

/// `huggingface_hub`'s reading of a boolean environment variable.
fn is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// A model repo and the revision (branch, tag or commit) to pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name` (or a bare `name`).
    pub repo: String,
    /// Branch, tag or commit hash; `main` when not given.
    pub revision: String,
}

/// A model name that is not `REPO[@REVISION]`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a hub model: expected ORG/NAME or ORG/NAME@REVISION (e.g. org/model@main)")]
pub struct InvalidRepo(String);

impl FromStr for RepoRef {
    type Err = InvalidRepo;

    fn from_str(spec: &str) -> Result<RepoRef, InvalidRepo> {
        let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        let valid_part = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        // A revision names a file under `refs/`: it must stay inside it.
        let valid_revision = !revision.is_empty()
            && !revision.starts_with('/')
            && revision.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if parts.len() > 2 || !parts.iter().all(|part| valid_part(part)) || !valid_revision {
            return Err(InvalidRepo(spec.to_string()));
        }
        Ok(RepoRef { repo: repo.to_string(), revision: revision.to_string() })
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// The `REPO[@REVISION][:SUBFOLDER]` an `--sd-model` of `hf:…` names; `None` for a folder.
pub fn hub_model(sd_model: &Path) -> Option<&str> {
    sd_model.to_str()?.strip_prefix(MODEL_PREFIX)
}

/// What `--sd-model hf:REPO[@REVISION][:SUBFOLDER]` pulls: a revision of a repo and, for repos
/// whose ONNX export is one folder of them, that folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// The repo and revision.
    pub repo: RepoRef,
    /// The folder holding `model_index.json`; the repo root when absent.
    pub subfolder: Option<String>,
}

impl FromStr for HubModel {
    type Err = InvalidRepo;

    fn from_str(spec: &str) -> Result<HubModel, InvalidRepo> {
        let (repo, subfolder) = match spec.split_once(':') {
            Some((repo, folder)) => (repo, Some(folder.to_string()).filter(|f| !f.is_empty())),
            None => (spec, None),
        };
        Ok(HubModel { repo: repo.parse()?, subfolder })
    }
}

impl fmt::Display for HubModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subfolder {
            Some(folder) => write!(f, "{}:{folder}", self.repo),
            None => write!(f, "{}", self.repo),
        }
    }
}

/// Why a pull failed; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The subfolder names no folder inside the repo.
    #[error("--subfolder {0:?} must be a relative folder inside the repo, without `..`")]
    BadSubfolder(String),
    /// The hub could not be reached or broke off.
    #[error(
        "cannot reach the hub at {url}: {source}; check HF_ENDPOINT and the network, or set \
         HF_HUB_OFFLINE=1 to use what is already in the cache"
    )]
    Unreachable {
        /// What was asked for.
        url: String,
        /// The transport's error.
        #[source]
        source: reqwest::Error,
    },
    /// A download broke off more often than it may be resumed.
    #[error(
        "downloading {url} broke off {attempts} times (last: {reason}); check the network and pull \
         again: the download resumes where it stopped"
    )]
    Interrupted {
        /// The file's URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// Why the last one stopped.
        reason: String,
    },
    /// 401/403: private or gated, or no such repo for an anonymous caller.
    #[error(
        "the hub refused access to {repo} (HTTP {status}): the repo is private or gated, or does \
         not exist; set HF_TOKEN to a token that can read it (https://huggingface.co/settings/tokens) \
         and, for a gated model, accept its terms on the model's page"
    )]
    Unauthorized {
        /// The repo.
        repo: String,
        /// 401 or 403.
        status: u16,
    },
    /// 404 for the repo or the revision.
    #[error("{what} not found on {endpoint} (HTTP 404): check the repo id and the revision")]
    NotFound {
        /// "repo org/name" or "revision main of org/name".
        what: String,
        /// The hub asked.
        endpoint: String,
    },
    /// Any other refusal.
    #[error("the hub answered HTTP {status} for {url}")]
    Status {
        /// What was asked for.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The hub's answer did not have the expected shape.
    #[error("unexpected answer from the hub for {url}: {reason}")]
    Protocol {
        /// What was asked for.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The folder has files but no ONNX export (a PyTorch-only repo).
    #[error(
        "{repo}@{revision} has no ONNX export in {folder} (no .onnx file), so deskgen cannot load it; \
         convert it with `onnx/export_sd.sh {repo} OUT_DIR` and pass --sd-model OUT_DIR"
    )]
    NoOnnx {
        /// The repo.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The folder looked in.
        folder: String,
    },
    /// The folder holds no ONNX pipeline of its own; other folders of the repo may.
    #[error(
        "{repo}@{revision} has no ONNX pipeline (model_index.json and .onnx files) in {folder}; {}",
        if elsewhere.is_empty() {
            "pass --subfolder with the folder that holds one".to_string()
        } else {
            format!("one is in: {} (pass --subfolder DIR)", elsewhere.join(", "))
        }
    )]
    NoPipeline {
        /// The repo.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The folder looked in.
        folder: String,
        /// Folders of the repo that hold an ONNX pipeline.
        elsewhere: Vec<String>,
    },
    /// Offline, and the cache lacks the repo, the revision or the folder.
    #[error(
        "{repo}@{revision}{} is not in the hub cache {cache_dir} and HF_HUB_OFFLINE is set: pull it \
         once with the network (`deskgen models pull {repo}@{revision}`) or unset HF_HUB_OFFLINE",
        if folder.is_empty() { String::new() } else { format!(" (folder {folder})") }
    )]
    NotCached {
        /// The repo.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The folder asked for.
        folder: String,
        /// The cache looked in.
        cache_dir: PathBuf,
    },
    /// An LFS file's bytes did not match its sha256, twice.
    #[error(
        "{path} from {repo} does not match its sha256 {expected} (got {actual}) after a second \
         download; the hub or a proxy in between is serving damaged data — try again later"
    )]
    Checksum {
        /// The repo.
        repo: String,
        /// The file in the repo.
        path: String,
        /// The hub's sha256 (its ETag).
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The cache could not be read or written.
    #[error("hub cache {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The filesystem's error.
        #[source]
        source: std::io::Error,
    },
}

/// Pulls the ONNX pipeline of `model` (restricted to `subfolder` of the repo, when given) into the
/// cache and returns the folder to load: `snapshots/{commit}/{subfolder}`. Files already in the
/// cache are not fetched again; `observer` hears what is planned and how it goes.
pub async fn pull(
    settings: &HubSettings,
    model: &RepoRef,
    subfolder: Option<&str>,
    observer: &dyn PullObserver,
) -> Result<PathBuf, HubError> {
    let folder = clean_subfolder(subfolder.unwrap_or(""))?;
    let cache = RepoCache::new(&settings.cache_dir, &model.repo);
    if settings.offline {
        return offline_model_dir(&cache, settings, model, &folder);
    }
    let client = HubClient::new(settings, &model.repo)?;
    let listing = client.revision(&model.revision).await?;
    let wanted = select::onnx_files(&listing.files, &folder).map_err(|missing| {
        let (repo, revision, folder) = (model.repo.clone(), model.revision.clone(), folder_label(&folder));
        match missing {
            select::Missing::Onnx { elsewhere } if elsewhere.is_empty() => {
                HubError::NoOnnx { repo, revision, folder }
            }
            select::Missing::Onnx { elsewhere } | select::Missing::ModelIndex { elsewhere } => {
                HubError::NoPipeline { repo, revision, folder, elsewhere }
            }
        }
    })?;
    let commit = listing.commit.as_str();
    let plan = futures::stream::iter(wanted.iter().map(|path| plan_file(&client, &cache, commit, path)))
        .buffered(PARALLEL_FILES)
        .try_collect::<Vec<_>>()
        .await?;
    observer.planned(&plan.iter().map(|(file, _)| file.clone()).collect::<Vec<_>>());
    let fetches = plan.iter().enumerate().filter_map(|(index, (file, meta))| {
        meta.as_ref().map(|meta| fetch_file(&client, &cache, commit, index, &file.path, meta, observer))
    });
    futures::stream::iter(fetches).buffer_unordered(PARALLEL_FILES).try_collect::<Vec<()>>().await?;
    cache.write_ref(&model.revision, commit)?;
    tracing::info!(model = %model, commit, files = plan.len(), "hub model in the cache");
    let dir = cache.snapshot(commit).join(&folder);
    write_known_defaults(&model.repo, &dir)?;
    Ok(dir)
}

/// A repo listed in `config/model-defaults.json` (the Turbo models) gets its
/// `deskgen-defaults.json` beside the configs, unless the folder has one already (a user's edit
/// stays).
fn write_known_defaults(repo: &str, dir: &Path) -> Result<(), HubError> {
    let path = dir.join(DEFAULTS_FILE);
    match ModelDefaults::known(repo) {
        Some(defaults) if !path.exists() => {
            defaults.write(dir).map_err(|source| HubError::Io { path, source })?;
            tracing::info!(repo, file = %dir.join(DEFAULTS_FILE).display(), "wrote the model's generation defaults");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The subfolder as a relative path with `/` separators; empty for the repo root.
fn clean_subfolder(subfolder: &str) -> Result<String, HubError> {
    let parts: Vec<&str> = subfolder.split('/').filter(|part| !part.is_empty() && *part != ".").collect();
    if subfolder.starts_with('/') || parts.contains(&"..") {
        return Err(HubError::BadSubfolder(subfolder.to_string()));
    }
    Ok(parts.join("/"))
}

/// How messages name a folder of the repo.
fn folder_label(folder: &str) -> String {
    if folder.is_empty() { "the repo root".into() } else { format!("folder {folder}") }
}

/// The model folder from the cache alone.
fn offline_model_dir(
    cache: &RepoCache,
    settings: &HubSettings,
    model: &RepoRef,
    folder: &str,
) -> Result<PathBuf, HubError> {
    cache
        .offline_snapshot(&model.revision)
        .map(|snapshot| snapshot.join(folder))
        .filter(|dir| dir.is_dir())
        .ok_or_else(|| HubError::NotCached {
            repo: model.repo.clone(),
            revision: model.revision.clone(),
            folder: folder.to_string(),
            cache_dir: settings.cache_dir.clone(),
        })
}

/// Whether `path` is already in the snapshot (or its blob in the cache, then linked now): the
/// planned file, and what to fetch when it is not.
async fn plan_file(
    client: &HubClient,
    cache: &RepoCache,
    commit: &str,
    path: &str,
) -> Result<(PlannedFile, Option<FileMeta>), HubError> {
    if let Some(size) = cache.linked_size(commit, path).await? {
        return Ok((PlannedFile { path: path.to_string(), size, cached: true }, None));
    }
    let meta = client.file_meta(commit, path).await?;
    if let Some(size) = cache.blob_size(&meta.etag).await? {
        cache.link(commit, path, &meta.etag)?;
        return Ok((PlannedFile { path: path.to_string(), size, cached: true }, None));
    }
    let size = meta.size.unwrap_or(0);
    Ok((PlannedFile { path: path.to_string(), size, cached: false }, Some(meta)))
}

/// Downloads one file into its blob (once more when an LFS file's sha256 does not match) and
/// links it into the snapshot.
async fn fetch_file(
    client: &HubClient,
    cache: &RepoCache,
    commit: &str,
    index: usize,
    path: &str,
    meta: &FileMeta,
    observer: &dyn PullObserver,
) -> Result<(), HubError> {
    let _lock = cache.lock(&meta.etag).await?;
    // Another process may have fetched it while this one waited for the lock.
    if cache.blob_size(&meta.etag).await?.is_none() {
        let partial = cache.incomplete(&meta.etag);
        let progress = |bytes| observer.position(index, bytes);
        let mut digest = client.download(commit, path, meta, &partial, &progress).await?;
        if let Some(expected) = meta.sha256().filter(|expected| *expected != digest) {
            tracing::warn!(path, expected, actual = %digest, "download does not match its sha256; fetching it again");
            cache.discard(&partial)?;
            digest = client.download(commit, path, meta, &partial, &progress).await?;
            if digest != expected {
                cache.discard(&partial)?;
                return Err(HubError::Checksum {
                    repo: client.repo().to_string(),
                    path: path.to_string(),
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        cache.complete(&meta.etag)?;
    }
    cache.link(commit, path, &meta.etag)?;
    observer.finished(index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_huggingface_hub_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
        };
        let defaults = HubSettings::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(defaults.endpoint, "https://huggingface.co");
        assert_eq!(defaults.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert!(!defaults.offline);
        let home = HubSettings::from_vars(vars(&[("HF_HOME", "/hf"), ("HF_HUB_OFFLINE", "YES")]));
        assert_eq!(home.cache_dir, Path::new("/hf/hub"));
        assert!(home.offline);
        let explicit = HubSettings::from_vars(vars(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/cache"),
            ("HF_ENDPOINT", "http://mirror/"),
            ("HF_TOKEN", "hf_x"),
            ("HF_HUB_OFFLINE", "0"),
        ]));
        assert_eq!(explicit.cache_dir, Path::new("/cache"));
        assert_eq!(explicit.endpoint, "http://mirror");
        assert_eq!(explicit.token.as_deref(), Some("hf_x"));
        assert!(!explicit.offline);
    }

    #[test]
    fn repo_refs_parse_with_a_default_revision() {
        let plain: RepoRef = "org/name".parse().unwrap();
        assert_eq!((plain.repo.as_str(), plain.revision.as_str()), ("org/name", "main"));
        let pr: RepoRef = "org/name@refs/pr/1".parse().unwrap();
        assert_eq!(pr.revision, "refs/pr/1");
        for bad in ["", "a/b/c", "org/", "../x", "org/na me", "org/name@", "org/name@../../x"] {
            assert!(bad.parse::<RepoRef>().is_err(), "{bad}");
        }
        assert_eq!(hub_model(Path::new("hf:org/name@v1")), Some("org/name@v1"));
        assert_eq!(hub_model(Path::new("models/sd")), None);
        let nested: HubModel = "org/name@v1:onnx/fp16".parse().unwrap();
        assert_eq!((nested.repo.revision.as_str(), nested.subfolder.as_deref()), ("v1", Some("onnx/fp16")));
        assert_eq!(nested.to_string(), "org/name@v1:onnx/fp16");
        let root: HubModel = "org/name".parse().unwrap();
        assert_eq!((root.subfolder.as_deref(), root.to_string()), (None, "org/name@main".to_string()));
        assert!("org/na me:onnx".parse::<HubModel>().is_err());
    }

    #[test]
    fn subfolders_stay_inside_the_repo() {
        assert_eq!(clean_subfolder("").unwrap(), "");
        assert_eq!(clean_subfolder("onnx/").unwrap(), "onnx");
        assert_eq!(clean_subfolder("a//b").unwrap(), "a/b");
        assert!(clean_subfolder("../x").is_err());
        assert!(clean_subfolder("/abs").is_err());
    }
}
