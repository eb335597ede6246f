//! Images as files under `<data-dir>/images`, served by this server at `/v1/images/{*key}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ObjectStore, Peek, StorageError, check_key, content_type, record};

/// Every key the file store accepts starts with this; the rest is the path under its root.
const KEY_PREFIX: &str = "images/";

/// Where uploaded photos are kept, under the root (keys `images/uploads/…`).
const UPLOADS_DIR: &str = "uploads";

/// Keys are unique (a fresh UUID per image), so a stored image never changes.
const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// Images stored as files in one directory tree.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: Arc<Path>,
    base_url: Url,
}

impl FileStore {
    /// Opens (creating it if needed) the directory `root`; URLs handed out start with `base_url`.
    pub async fn open(root: PathBuf, base_url: &str) -> Result<Self, StorageError> {
        let base_url = Url::parse(base_url)
            .map_err(|e| StorageError::Config(format!("image base URL {base_url:?}: {e}")))?;
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| StorageError::Config(format!("cannot create {}: {e}", root.display())))?;
        let root = tokio::fs::canonicalize(&root)
            .await
            .map_err(|e| StorageError::Config(format!("cannot open {}: {e}", root.display())))?;
        Ok(FileStore { root: root.into(), base_url })
    }

    /// The directory images are stored in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_for(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        let relative = key
            .strip_prefix(KEY_PREFIX)
            .ok_or_else(|| StorageError::InvalidKey { key: key.to_owned(), reason: "not under images/" })?;
        Ok(self.root.join(relative))
    }

    async fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), std::io::Error> {
        let parent = path.parent().unwrap_or(&self.root);
        tokio::fs::create_dir_all(parent).await?;
        // Write then rename, so a reader never sees half an image.
        let partial = parent.join(format!(".partial-{}", uuid::Uuid::new_v4()));
        let mut file = tokio::fs::File::create(&partial).await?;
        let written = async {
            file.write_all(bytes).await?;
            file.sync_all().await?;
            tokio::fs::rename(&partial, path).await
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        written
    }
}

#[async_trait]
impl ObjectStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn put_image(&self, key: &str, image: Bytes) -> Result<String, StorageError> {
        let path = self.path_for(key)?;
        let written = self.write(&path, &image).await;
        record("file", "put", written.is_ok());
        written.map_err(|e| StorageError::Upload {
            key: key.to_owned(),
            attempts: 1,
            reason: e.to_string(),
        })?;
        self.url_for(key).await
    }

    async fn get(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        let path = self.path_for(key)?;
        let read = async {
            let size = tokio::fs::metadata(&path).await?.len();
            if size > max_bytes {
                return Ok(None);
            }
            tokio::fs::read(&path).await.map(Some)
        }
        .await;
        record("file", "get", read.is_ok());
        match read {
            Ok(Some(bytes)) => Ok(bytes.into()),
            Ok(None) => Err(StorageError::TooLarge { key: key.to_owned(), limit: max_bytes }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NotFound { key: key.to_owned() })
            }
            Err(e) => Err(StorageError::Read { key: key.to_owned(), reason: e.to_string() }),
        }
    }

    async fn peek(&self, key: &str, len: u64) -> Result<Peek, StorageError> {
        let path = self.path_for(key)?;
        let read = async {
            let file = tokio::fs::File::open(&path).await?;
            let size = file.metadata().await?.len();
            let mut head = Vec::with_capacity(len.min(size) as usize);
            file.take(len).read_to_end(&mut head).await?;
            Ok::<_, std::io::Error>(Peek { size, head: head.into() })
        }
        .await;
        record("file", "peek", read.is_ok());
        read.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StorageError::NotFound { key: key.to_owned() },
            _ => StorageError::Read { key: key.to_owned(), reason: e.to_string() },
        })
    }

    async fn url_for(&self, key: &str) -> Result<String, StorageError> {
        self.reference(key)
    }

    fn reference(&self, key: &str) -> Result<String, StorageError> {
        check_key(key)?;
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|()| {
                StorageError::Config(format!("image base URL {} cannot take a path", self.base_url))
            })?
            .pop_if_empty()
            .push("v1")
            .extend(key.split('/'));
        Ok(url.into())
    }

    fn key_for_url(&self, url: &str) -> Option<String> {
        let url = Url::parse(url).ok()?;
        let base = &self.base_url;
        if url.scheme() != base.scheme()
            || url.host() != base.host()
            || url.port_or_known_default() != base.port_or_known_default()
        {
            return None;
        }
        let prefix = format!("{}/v1/{KEY_PREFIX}", base.path().trim_end_matches('/'));
        let rest = url.path().strip_prefix(&prefix)?;
        let key = format!("{KEY_PREFIX}{}", percent_encoding::percent_decode_str(rest).decode_utf8().ok()?);
        check_key(&key).ok().map(|()| key)
    }

    async fn check(&self) -> Result<(), StorageError> {
        let metadata = tokio::fs::metadata(&self.root)
            .await
            .map_err(|e| StorageError::Unavailable(format!("{}: {e}", self.root.display())))?;
        if metadata.permissions().readonly() {
            return Err(StorageError::Unavailable(format!("{} is read-only", self.root.display())));
        }
        Ok(())
    }

    fn router(&self) -> Option<axum::Router> {
        Some(image_router(self.root.clone()))
    }

    async fn purge_uploads(&self, ttl: Duration) -> Result<usize, StorageError> {
        let uploads = self.root.join(UPLOADS_DIR);
        let cutoff = SystemTime::now().checked_sub(ttl).unwrap_or(UNIX_EPOCH);
        let purged = tokio::task::spawn_blocking(move || remove_older(&uploads, cutoff))
            .await
            .map_err(|e| StorageError::Unavailable(format!("purging uploads: {e}")))?;
        purged.map_err(|e| StorageError::Unavailable(format!("purging uploads: {e}")))
    }
}

/// Removes the files under `dir` last modified before `cutoff`, and the folders that leaves empty
/// when nothing was added to them since `cutoff` either (not `dir` itself: a day's folder that
/// still receives uploads stays); returns how many files went.
fn remove_older(dir: &Path, cutoff: SystemTime) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let metadata = entry.metadata()?;
        let path = entry.path();
        if metadata.is_dir() {
            removed += remove_older(&path, cutoff)?;
            if metadata.modified()? < cutoff {
                // Fails, as it should, while the folder still holds a photo.
                let _ = std::fs::remove_dir(&path);
            }
        } else if metadata.modified()? < cutoff {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `GET /v1/images/{*key}`: the files under `root`, with ETag revalidation.
fn image_router(root: Arc<Path>) -> axum::Router {
    axum::Router::new().route("/v1/images/{*key}", get(serve_image)).with_state(root)
}

async fn serve_image(
    State(root): State<Arc<Path>>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    // The router has already percent-decoded the key, so encoded traversal is caught here too.
    if check_key(&key).is_err() {
        return (StatusCode::BAD_REQUEST, "invalid image key").into_response();
    }
    let not_found = || (StatusCode::NOT_FOUND, "image not found").into_response();
    // Resolve symlinks and refuse anything that lands outside the root.
    let Ok(path) = tokio::fs::canonicalize(root.join(&key)).await else { return not_found() };
    if !path.starts_with(&root) {
        return not_found();
    }
    let Ok(file) = tokio::fs::File::open(&path).await else { return not_found() };
    let Ok(metadata) = file.metadata().await else { return not_found() };
    if !metadata.is_file() {
        return not_found();
    }
    let modified =
        metadata.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    let etag = format!("\"{:x}-{:x}\"", metadata.len(), modified.as_nanos());
    let mut response = if if_none_match(&headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&key)));
        headers.insert(header::CONTENT_LENGTH, metadata.len().into());
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    response
}

/// Whether the client's `If-None-Match` already names `etag` (weak comparison, as RFC 9110 asks).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|candidate| {
            let candidate = candidate.trim();
            candidate == "*" || candidate.trim_start_matches("W/") == etag
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uploads_older_than_the_ttl_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().to_path_buf(), "http://127.0.0.1:1").await.unwrap();
        let put = async |key: &str, age: Duration| {
            store.put_image(key, Bytes::from_static(b"photo")).await.unwrap();
            let path = store.path_for(key).unwrap();
            let when = SystemTime::now() - age;
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(when).unwrap();
            std::fs::File::open(path.parent().unwrap()).unwrap().set_modified(when).unwrap();
            path
        };
        let day = Duration::from_secs(86_400);
        let stale = put("images/uploads/2026/01/02/old.jpg", 8 * day).await;
        let fresh = put("images/uploads/2026/01/09/new.jpg", day).await;
        let result = put("images/2026/01/02/result.png", 30 * day).await;

        assert_eq!(store.purge_uploads(7 * day).await.unwrap(), 1);
        assert!(!stale.exists() && !stale.parent().unwrap().exists(), "the emptied day is gone too");
        assert!(fresh.exists(), "a photo younger than the ttl stays");
        assert!(result.exists(), "generated images are not uploads");
        assert_eq!(store.purge_uploads(7 * day).await.unwrap(), 0);
    }
}
