//! Object storage for generated images: files under the data directory, or S3.
//!
//! Both stores keep objects under keys like `images/2026/11/26/<uuid>.png` and hand back a URL
//! a client can download the object from.

mod file;
mod s3;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use file::FileStore;
pub use s3::S3Store;

/// Where file-store URLs point when neither `--image-base-url` nor a listener says otherwise.
pub const DEFAULT_IMAGE_BASE_URL: &str = "http://127.0.0.1:8080";

/// Default number of upload attempts before an upload fails.
pub const DEFAULT_UPLOAD_ATTEMPTS: u32 = 4;

/// Which object store keeps generated images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStoreKind {
    /// Files under `<data-dir>/images`, served by this server at `/v1/images/`.
    File,
    /// An S3 bucket, or a bucket on an S3-compatible server.
    S3,
}

/// Where generated images go.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Object store for generated images: file (under the data directory) or s3.
    pub object_store: ObjectStoreKind,
    /// Base URL clients reach this server at; file-store image URLs start with it. None means
    /// [`DEFAULT_IMAGE_BASE_URL`]; an API node fills in the address it listens on.
    pub image_base_url: Option<String>,
    /// S3 bucket for generated images (required with --object-store s3).
    pub s3_bucket: Option<String>,
    /// S3 region (default: from the AWS configuration chain, else us-east-1).
    pub s3_region: Option<String>,
    /// Endpoint of an S3-compatible server, e.g. http://127.0.0.1:9000.
    pub s3_endpoint: Option<String>,
    /// Address buckets as endpoint/bucket/key instead of bucket.endpoint/key.
    pub s3_force_path_style: bool,
    /// Public base URL of the bucket (a CDN, say); image URLs become <base>/<key>.
    pub s3_public_base_url: Option<String>,
    /// Return presigned GET URLs valid this long (e.g. 1h, at most 7 days) instead of public URLs.
    pub s3_presign_ttl: Option<Duration>,
    /// Attempts per upload before it fails.
    pub s3_upload_attempts: u32,
    /// Delay before the first upload retry; it doubles with every further attempt.
    pub s3_retry_backoff: Duration,
    /// Time allowed for one S3 request attempt.
    pub s3_timeout: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            object_store: ObjectStoreKind::File,
            image_base_url: None,
            s3_bucket: None,
            s3_region: None,
            s3_endpoint: None,
            s3_force_path_style: false,
            s3_public_base_url: None,
            s3_presign_ttl: None,
            s3_upload_attempts: DEFAULT_UPLOAD_ATTEMPTS,
            s3_retry_backoff: Duration::from_millis(200),
            s3_timeout: Duration::from_secs(30),
        }
    }
}

/// Object store failures.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The key is empty, absolute, or escapes the store (`..`).
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// Every upload attempt failed.
    #[error("failed to upload {key} after {attempts} attempt(s): {reason}")]
    Upload { key: String, attempts: u32, reason: String },
    /// No object under that key.
    #[error("object {key} not found")]
    NotFound { key: String },
    /// The object is bigger than the caller accepts.
    #[error("object {key} is larger than the limit of {limit} bytes")]
    TooLarge { key: String, limit: u64 },
    /// Reading the object failed.
    #[error("cannot read object {key}: {reason}")]
    Read { key: String, reason: String },
    /// The store cannot be reached or used.
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// The configuration is incomplete or invalid.
    #[error("object store misconfigured: {0}")]
    Config(String),
}

/// Somewhere generated images are kept.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// "file" or "s3", for logs, metrics and `/info`.
    fn kind(&self) -> &'static str;

    /// Stores an image under `key`, typed by the key's extension (retrying transient failures), and
    /// returns the URL to fetch it from.
    async fn put_image(&self, key: &str, image: Bytes) -> Result<String, StorageError>;

    /// How a request names the object under `key` in `initial_image_url`: `s3://bucket/key` in a
    /// bucket, the server's own `/v1/images/…` URL in the file store. [`ObjectStore::key_for_url`]
    /// recognises it.
    fn reference(&self, key: &str) -> Result<String, StorageError>;

    /// Reads the object under `key`, refusing objects bigger than `max_bytes`.
    async fn get(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError>;

    /// The size of the object under `key` and its first `len` bytes (all of it when shorter),
    /// without reading the rest: a HEAD and a ranged read.
    async fn peek(&self, key: &str, len: u64) -> Result<Peek, StorageError>;

    /// A URL for the object under `key`: public, or presigned with a fresh expiry.
    async fn url_for(&self, key: &str) -> Result<String, StorageError>;

    /// The key of the object `url` names when it points into this store, so it can be read with
    /// the store's own credentials instead of over the public internet.
    fn key_for_url(&self, url: &str) -> Option<String>;

    /// Checks the store is usable (bucket reachable, directory writable), for health checks.
    async fn check(&self) -> Result<(), StorageError>;

    /// Routes serving the stored objects over HTTP, for stores that need this server to do it.
    fn router(&self) -> Option<axum::Router> {
        None
    }

    /// Removes uploaded photos (`images/uploads/…`) stored longer ago than `ttl`; returns how many
    /// went. Stores whose own rules expire objects (an S3 lifecycle rule) remove nothing here.
    async fn purge_uploads(&self, _ttl: Duration) -> Result<usize, StorageError> {
        Ok(0)
    }

    /// A request a client can store the object under `key` with, straight into the store, valid
    /// for `ttl`; `None` where the store has no such thing (the file store: upload to this server).
    async fn presign_put(
        &self,
        _key: &str,
        _content_type: &str,
        _ttl: Duration,
    ) -> Result<Option<PresignedPut>, StorageError> {
        Ok(None)
    }
}

/// The start of a stored object, and how big all of it is.
#[derive(Debug, Clone)]
pub struct Peek {
    /// The whole object's size in bytes.
    pub size: u64,
    /// Its first bytes.
    pub head: Bytes,
}

/// A presigned upload: a PUT of the object's bytes to `url`, with exactly these headers.
#[derive(Debug, Clone)]
pub struct PresignedPut {
    /// Where to PUT the bytes.
    pub url: String,
    /// Headers the signature covers; the PUT must send them as they are.
    pub headers: Vec<(String, String)>,
}

/// Opens the configured object store. The file store lives under `<data_dir>/images`; the S3
/// store takes credentials from the standard AWS chain (environment, profile, SSO, IMDS, …).
pub async fn build(config: &StorageConfig, data_dir: &Path) -> Result<Arc<dyn ObjectStore>, StorageError> {
    match config.object_store {
        ObjectStoreKind::File => {
            let base_url = config.image_base_url.as_deref().unwrap_or(DEFAULT_IMAGE_BASE_URL);
            Ok(Arc::new(FileStore::open(data_dir.join("images"), base_url).await?))
        }
        ObjectStoreKind::S3 => Ok(Arc::new(S3Store::from_environment(config).await?)),
    }
}

/// A fresh key for a generated image: `images/YYYY/MM/DD/<uuid>.png` (UTC date).
pub fn new_image_key() -> String {
    format!("images/{}/{}.png", chrono::Utc::now().format("%Y/%m/%d"), uuid::Uuid::new_v4())
}

/// A fresh key for a photo a user handed in: `images/uploads/YYYY/MM/DD/<uuid>.<extension>`.
pub fn new_upload_key(extension: &str) -> String {
    format!("images/uploads/{}/{}.{extension}", chrono::Utc::now().format("%Y/%m/%d"), uuid::Uuid::new_v4())
}

/// The media type of the object under `key`, from its extension.
pub(crate) fn content_type(key: &str) -> &'static str {
    let extension = key.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).unwrap_or_default();
    match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        _ => "application/octet-stream",
    }
}

/// Refuses keys that could name something outside the store once used as a path.
pub(crate) fn check_key(key: &str) -> Result<(), StorageError> {
    let invalid = |reason| Err(StorageError::InvalidKey { key: key.to_owned(), reason });
    if key.is_empty() || key.len() > 1024 {
        return invalid("empty or longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return invalid("absolute");
    }
    if key.contains('\\') || key.chars().any(char::is_control) {
        return invalid("backslash or control character");
    }
    if key.split('/').any(|segment| segment.is_empty() || segment == "." || segment == "..") {
        return invalid("empty, '.' or '..' path segment");
    }
    Ok(())
}

/// Counts an object store operation: `deskgen_storage_operations_total{backend,operation,outcome}`.
fn record(backend: &'static str, operation: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!("deskgen_storage_operations_total", "backend" => backend, "operation" => operation, "outcome" => outcome)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_are_dated_pngs() {
        let key = new_image_key();
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 5, "{key}");
        assert_eq!(parts[0], "images");
        assert_eq!(parts[1].len(), 4);
        assert!(parts[4].ends_with(".png") && parts[4].len() == 36 + 4, "{key}");
        check_key(&key).unwrap();
    }

    #[test]
    fn traversal_keys_are_refused() {
        for key in ["", "/etc/passwd", "images/../x", "images/./x", "images//x", "a\\b", "images/x\0"] {
            assert!(check_key(key).is_err(), "{key:?}");
        }
    }
}
