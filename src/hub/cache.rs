//! One repo's folder in the hub cache, laid out as `huggingface_hub` lays it out:
//! `blobs/{etag}` holds the bytes, `snapshots/{commit}/{path}` is a relative link to the blob,
//! `refs/{revision}` holds the commit, and `.locks/` beside the repo folders serialises writers.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::HubError;

/// Bytes hashed per read when checking a blob.
const HASH_CHUNK: usize = 1 << 20;

/// The cache folder of one model repo.
pub(super) struct RepoCache {
    root: PathBuf,
    locks: PathBuf,
}

/// Holds an exclusive lock on one blob until dropped (closing the file releases it).
pub(super) struct BlobLock {
    _file: std::fs::File,
}

impl RepoCache {
    /// The folder of `repo` (`org/name`) under `cache_dir`: `models--org--name`.
    pub fn new(cache_dir: &Path, repo: &str) -> RepoCache {
        let folder = format!("models--{}", repo.replace('/', "--"));
        RepoCache { root: cache_dir.join(&folder), locks: cache_dir.join(".locks").join(folder) }
    }

    /// `snapshots/{commit}`.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// Where the blob of `etag` is written until it is complete.
    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    /// The size of the file `path` of `commit` when the snapshot already links it to a sound blob;
    /// a link to a missing or damaged blob is removed (with the blob), so it is fetched again.
    pub async fn linked_size(&self, commit: &str, path: &str) -> Result<Option<u64>, HubError> {
        let pointer = self.snapshot(commit).join(path);
        let Ok(target) = std::fs::read_link(&pointer) else {
            // A plain file (a copy made where links are not allowed) stands for itself.
            return Ok(std::fs::metadata(&pointer).ok().filter(|m| m.is_file()).map(|m| m.len()));
        };
        let etag = target.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        let size = self.blob_size(etag).await?;
        if size.is_none() {
            remove_if_present(&pointer)?;
        }
        Ok(size)
    }

    /// The size of the blob of `etag` when it is present and, for an LFS file (whose etag is its
    /// sha256), its bytes match; a damaged blob is removed.
    pub async fn blob_size(&self, etag: &str) -> Result<Option<u64>, HubError> {
        let blob = self.blob(etag);
        let Ok(metadata) = std::fs::metadata(&blob) else { return Ok(None) };
        if !is_sha256(etag) {
            return Ok(Some(metadata.len()));
        }
        let digest = sha256_file(&blob).await?;
        if digest == etag {
            return Ok(Some(metadata.len()));
        }
        tracing::warn!(blob = %blob.display(), actual = %digest, "cached blob does not match its sha256; fetching it again");
        remove_if_present(&blob)?;
        Ok(None)
    }

    /// Moves the finished download of `etag` into place.
    pub fn complete(&self, etag: &str) -> Result<(), HubError> {
        let blob = self.blob(etag);
        std::fs::rename(self.incomplete(etag), &blob).map_err(|source| HubError::Io { path: blob, source })
    }

    /// Removes a damaged download.
    pub fn discard(&self, partial: &Path) -> Result<(), HubError> {
        remove_if_present(partial)
    }

    /// Links `snapshots/{commit}/{path}` to the blob of `etag`, relatively, as `huggingface_hub` does.
    pub fn link(&self, commit: &str, path: &str, etag: &str) -> Result<(), HubError> {
        let pointer = self.snapshot(commit).join(path);
        let io = |source| HubError::Io { path: pointer.clone(), source };
        std::fs::create_dir_all(pointer.parent().expect("a snapshot file has a folder")).map_err(io)?;
        remove_if_present(&pointer)?;
        std::os::unix::fs::symlink(relative_blob(path, etag), &pointer).map_err(io)
    }

    /// Records that `revision` is `commit` (`refs/{revision}`, no newline); nothing for a commit.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        let io = |source| HubError::Io { path: path.clone(), source };
        std::fs::create_dir_all(path.parent().expect("a ref has a folder")).map_err(io)?;
        std::fs::write(&path, commit).map_err(io)
    }

    /// The snapshot of `revision` (a ref, or a commit hash) from the cache alone.
    pub fn offline_snapshot(&self, revision: &str) -> Option<PathBuf> {
        let commit = match std::fs::read_to_string(self.root.join("refs").join(revision)) {
            Ok(commit) => commit.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        Some(self.snapshot(&commit)).filter(|snapshot| snapshot.is_dir())
    }

    /// Waits for the lock on the blob of `etag`; the same lock file `huggingface_hub` takes, so a
    /// Python download and this one never write the same blob at once.
    pub async fn lock(&self, etag: &str) -> Result<BlobLock, HubError> {
        let path = self.locks.join(format!("{etag}.lock"));
        let locked = tokio::task::spawn_blocking(move || {
            let io = |source| HubError::Io { path: path.clone(), source };
            std::fs::create_dir_all(path.parent().expect("a lock file has a folder")).map_err(io)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io)?;
            // SAFETY: flock on a descriptor this function owns; the lock lives as long as the file.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
            Ok(BlobLock { _file: file })
        });
        locked.await.expect("locking does not panic")
    }
}

/// `../` up from the file's folder in the snapshot to the repo folder, then `blobs/{etag}`.
fn relative_blob(path: &str, etag: &str) -> PathBuf {
    let depth = path.split('/').count() + 1;
    PathBuf::from(format!("{}blobs/{etag}", "../".repeat(depth)))
}

/// Whether an etag is an LFS file's sha256 (a git blob's is a 40-digit sha1).
pub(super) fn is_sha256(etag: &str) -> bool {
    etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The sha256 of a file, in hex, read off the async runtime.
async fn sha256_file(path: &Path) -> Result<String, HubError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let io = |source| HubError::Io { path: path.clone(), source };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0; HASH_CHUNK];
        loop {
            let read = file.read(&mut buffer).map_err(io)?;
            if read == 0 {
                return Ok(hex::encode(hasher.finalize()));
            }
            hasher.update(&buffer[..read]);
        }
    })
    .await
    .expect("hashing does not panic")
}

fn remove_if_present(path: &Path) -> Result<(), HubError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(HubError::Io { path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_climb_out_of_nested_folders() {
        assert_eq!(relative_blob("model_index.json", "e"), Path::new("../../blobs/e"));
        assert_eq!(relative_blob("unet/model.onnx", "e"), Path::new("../../../blobs/e"));
        assert_eq!(relative_blob("onnx/unet/model.onnx", "e"), Path::new("../../../../blobs/e"));
    }

    #[test]
    fn repo_folders_are_named_as_huggingface_hub_names_them() {
        let cache = RepoCache::new(Path::new("/c"), "org/name");
        assert_eq!(cache.snapshot("abc"), Path::new("/c/models--org--name/snapshots/abc"));
        assert_eq!(cache.incomplete("e"), Path::new("/c/models--org--name/blobs/e.incomplete"));
        assert!(is_sha256(&"a".repeat(64)) && !is_sha256(&"a".repeat(40)));
    }
}
