//! The hub's HTTP protocol: a revision's file list, one file's metadata (a HEAD that does not
//! follow the LFS redirect, whose headers carry the sha256), and its bytes, resumed with `Range`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{CONTENT_LENGTH, ETAG, HeaderMap, RANGE};
use reqwest::{RequestBuilder, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::cache::is_sha256;
use super::{HubError, HubSettings};

/// How often one file's download may break off before the pull fails.
const MAX_RESUMES: u32 = 4;
/// Pause before resuming, times the attempt.
const RESUME_PAUSE: Duration = Duration::from_millis(200);
/// Characters kept as they are in a URL path segment (as `urllib.parse.quote` keeps them).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Talks to the hub about one repo.
pub(super) struct HubClient {
    http: reqwest::Client,
    /// For HEAD requests, which must see the redirect's own headers.
    no_redirects: reqwest::Client,
    endpoint: String,
    token: Option<String>,
    repo: String,
}

/// A revision's commit and every file in it.
pub(super) struct Listing {
    /// The full commit hash.
    pub commit: String,
    /// Paths from the repo root.
    pub files: Vec<String>,
}

#[derive(serde::Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

/// What the hub says about one file before it is fetched.
pub(super) struct FileMeta {
    /// The blob's name: an LFS file's sha256, else the git blob id.
    pub etag: String,
    /// Bytes, when the hub says.
    pub size: Option<u64>,
}

impl FileMeta {
    /// The sha256 the bytes must have (LFS files).
    pub fn sha256(&self) -> Option<&str> {
        is_sha256(&self.etag).then_some(self.etag.as_str())
    }
}

/// Why one attempt at a download stopped.
enum Stopped {
    /// Broken off; resuming may help.
    Dropped(String),
    /// Refused, or the disk failed; resuming will not help.
    Failed(HubError),
}

impl HubClient {
    /// A client for `repo` with the settings' endpoint and token.
    pub fn new(settings: &HubSettings, repo: &str) -> Result<HubClient, HubError> {
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("deskgen/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(15))
                .read_timeout(Duration::from_secs(60))
        };
        let unreachable = |source| HubError::Unreachable { url: settings.endpoint.clone(), source };
        Ok(HubClient {
            http: builder().build().map_err(unreachable)?,
            no_redirects: builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(unreachable)?,
            endpoint: settings.endpoint.clone(),
            token: settings.token.clone(),
            repo: repo.to_string(),
        })
    }

    /// The repo this client asks about.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// `GET /api/models/{repo}/revision/{revision}`: the commit and its files.
    pub async fn revision(&self, revision: &str) -> Result<Listing, HubError> {
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, self.repo, encode(revision));
        let response = self.send(self.http.get(&url), &url).await?;
        if response.status() == StatusCode::NOT_FOUND {
            let code = response.headers().get("x-error-code").and_then(|v| v.to_str().ok());
            let what = match code {
                Some("RevisionNotFound") => format!("revision {revision} of {}", self.repo),
                _ => format!("repo {}", self.repo),
            };
            return Err(HubError::NotFound { what, endpoint: self.endpoint.clone() });
        }
        let response = self.accepted(response, &url)?;
        let info: RevisionInfo = response.json().await.map_err(|e| HubError::Protocol {
            url: url.clone(),
            reason: format!("not a revision's JSON ({e})"),
        })?;
        if !is_commit(&info.sha) {
            return Err(HubError::Protocol { url, reason: format!("{:?} is not a commit hash", info.sha) });
        }
        Ok(Listing { commit: info.sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect() })
    }

    /// `HEAD /{repo}/resolve/{commit}/{path}`, not following the LFS redirect: the blob's etag and
    /// size.
    pub async fn file_meta(&self, commit: &str, path: &str) -> Result<FileMeta, HubError> {
        let url = self.resolve_url(commit, path);
        let request = self.no_redirects.head(&url).header("accept-encoding", "identity");
        let response = self.send(request, &url).await?;
        if response.status() == StatusCode::NOT_FOUND {
            let what = format!("file {path} of {} at {commit}", self.repo);
            return Err(HubError::NotFound { what, endpoint: self.endpoint.clone() });
        }
        // An LFS file answers with a redirect to its storage; its headers are the file's.
        let response =
            if response.status().is_redirection() { response } else { self.accepted(response, &url)? };
        meta_from(response.headers(), commit, &url)
    }

    /// Downloads `path` of `commit` into `partial`, resuming what it already holds and resuming
    /// again when the connection breaks; `progress` hears the bytes on disk. The sha256 of the
    /// whole file, in hex.
    pub async fn download(
        &self,
        commit: &str,
        path: &str,
        meta: &FileMeta,
        partial: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<String, HubError> {
        let url = self.resolve_url(commit, path);
        let mut part = Partial::open(partial).await?;
        progress(part.written);
        let mut drops = 0;
        loop {
            match self.transfer(&url, &mut part, meta.size, progress).await {
                Ok(()) => return part.finish().await,
                Err(Stopped::Dropped(reason)) if drops < MAX_RESUMES => {
                    drops += 1;
                    tracing::warn!(path, at = part.written, %reason, "download broke off; resuming");
                    tokio::time::sleep(RESUME_PAUSE * drops).await;
                }
                Err(Stopped::Dropped(reason)) => {
                    return Err(HubError::Interrupted { url, attempts: drops + 1, reason });
                }
                Err(Stopped::Failed(error)) => return Err(error),
            }
        }
    }

    /// One GET of the rest of the file, appended to `part`.
    async fn transfer(
        &self,
        url: &str,
        part: &mut Partial,
        size: Option<u64>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), Stopped> {
        if part.written > 0 && size == Some(part.written) {
            return Ok(());
        }
        let mut request = self.authorized(self.http.get(url));
        if part.written > 0 {
            request = request.header(RANGE, format!("bytes={}-", part.written));
        }
        let response = request.send().await.map_err(|e| Stopped::Dropped(chain(&e)))?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT if range_start(response.headers()) == Some(part.written) => {}
            // The whole file: the server ignored the range, or the partial file was not usable.
            StatusCode::OK => part.restart().await.map_err(Stopped::Failed)?,
            StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                part.restart().await.map_err(Stopped::Failed)?;
                return Err(Stopped::Dropped("the server did not resume at the partial file's end".into()));
            }
            status if status.is_server_error() => return Err(Stopped::Dropped(format!("HTTP {status}"))),
            status => return Err(Stopped::Failed(self.refusal(status, url))),
        }
        progress(part.written);
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Stopped::Dropped(chain(&e)))?;
            part.write(&chunk).await.map_err(Stopped::Failed)?;
            progress(part.written);
        }
        match size {
            Some(size) if part.written < size => {
                Err(Stopped::Dropped(format!("the connection closed at {} of {size} bytes", part.written)))
            }
            Some(size) if part.written > size => {
                part.restart().await.map_err(Stopped::Failed)?;
                Err(Stopped::Dropped(format!("more than the announced {size} bytes arrived")))
            }
            _ => Ok(()),
        }
    }

    fn resolve_url(&self, commit: &str, path: &str) -> String {
        let path: Vec<String> = path.split('/').map(encode).collect();
        format!("{}/{}/resolve/{commit}/{}", self.endpoint, self.repo, path.join("/"))
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends with the token; an unreachable hub is an error.
    async fn send(&self, request: RequestBuilder, url: &str) -> Result<Response, HubError> {
        self.authorized(request)
            .send()
            .await
            .map_err(|source| HubError::Unreachable { url: url.to_string(), source })
    }

    /// The response when it is a success; its refusal otherwise.
    fn accepted(&self, response: Response, url: &str) -> Result<Response, HubError> {
        if response.status().is_success() { Ok(response) } else { Err(self.refusal(response.status(), url)) }
    }

    /// What a status other than the expected one means.
    fn refusal(&self, status: StatusCode, url: &str) -> HubError {
        match status.as_u16() {
            401 | 403 => HubError::Unauthorized { repo: self.repo.clone(), status: status.as_u16() },
            _ => HubError::Status { url: url.to_string(), status: status.as_u16() },
        }
    }
}

/// The etag and size from a resolve HEAD's headers (`X-Linked-*` on an LFS redirect).
fn meta_from(headers: &HeaderMap, commit: &str, url: &str) -> Result<FileMeta, HubError> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(served) = text("x-repo-commit").filter(|served| *served != commit) {
        return Err(HubError::Protocol {
            url: url.into(),
            reason: format!("served commit {served}, not {commit}"),
        });
    }
    let etag = text("x-linked-etag").or_else(|| text(ETAG.as_str())).map(normalize_etag);
    let Some(etag) = etag.filter(|etag| !etag.is_empty()) else {
        return Err(HubError::Protocol { url: url.into(), reason: "no ETag header".into() });
    };
    let size = text("x-linked-size").or_else(|| text(CONTENT_LENGTH.as_str())).and_then(|v| v.parse().ok());
    Ok(FileMeta { etag, size })
}

/// An ETag without its weak marker and quotes, as `huggingface_hub` names blobs.
fn normalize_etag(etag: &str) -> String {
    etag.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// The first byte of a `Content-Range: bytes START-END/SIZE`.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let range = headers.get("content-range")?.to_str().ok()?;
    range.strip_prefix("bytes ")?.split('-').next()?.parse().ok()
}

fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

fn is_commit(sha: &str) -> bool {
    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An error with its causes, which say what actually went wrong.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A download in progress: the `.incomplete` file and the hash of what it holds.
struct Partial {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    written: u64,
}

impl Partial {
    /// Opens `path` for appending, hashing what an earlier attempt left in it.
    async fn open(path: &Path) -> Result<Partial, HubError> {
        let owned = path.to_path_buf();
        let (hasher, written) = tokio::task::spawn_blocking(move || hash_prefix(&owned))
            .await
            .expect("hashing does not panic")
            .map_err(|source| HubError::Io { path: path.to_path_buf(), source })?;
        let io = |source| HubError::Io { path: path.to_path_buf(), source };
        tokio::fs::create_dir_all(path.parent().expect("a blob has a folder")).await.map_err(io)?;
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await.map_err(io)?;
        Ok(Partial { path: path.to_path_buf(), file, hasher, written })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), HubError> {
        self.file.write_all(chunk).await.map_err(|source| self.io(source))?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Empties the file, for a download from the first byte.
    async fn restart(&mut self) -> Result<(), HubError> {
        self.file.flush().await.map_err(|source| self.io(source))?;
        self.file.set_len(0).await.map_err(|source| self.io(source))?;
        self.hasher = Sha256::new();
        self.written = 0;
        Ok(())
    }

    /// Flushes the file to disk; the sha256 of its bytes.
    async fn finish(mut self) -> Result<String, HubError> {
        self.file.flush().await.map_err(|source| self.io(source))?;
        self.file.sync_all().await.map_err(|source| self.io(source))?;
        Ok(hex::encode(self.hasher.finalize()))
    }

    fn io(&self, source: std::io::Error) -> HubError {
        HubError::Io { path: self.path.clone(), source }
    }
}

/// The hash and length of what `path` holds (nothing when it does not exist).
fn hash_prefix(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    let written = std::io::copy(&mut std::io::BufReader::new(file), &mut hasher)?;
    Ok((hasher, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_weak_markers_and_quotes() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }

    #[test]
    fn revisions_and_paths_are_encoded_per_segment() {
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode("my file.json"), "my%20file.json");
    }
}
