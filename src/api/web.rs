//! The browser demo page at `/`: the committed build of `web/` (`make web`), embedded in the
//! binary so serving it needs neither npm nor files on disk. Open without an API key; the page's
//! own grpc-web calls carry the key the person enters.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// Scripts, styles and API calls only from this origin; images from anywhere (S3, shops), and
/// `blob:` for the preview of a photo chosen on the page before it is sent.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     img-src 'self' https: http: data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    bytes: &'static [u8],
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(bytes: &'static [u8], content_type: &'static str) -> Asset {
        let digest = Sha256::digest(bytes);
        Asset { bytes, content_type, etag: format!("\"{}\"", hex::encode(&digest[..16])) }
    }

    /// The file, or 304 when the browser's copy is current. Names are not content-hashed, so
    /// browsers revalidate every time (`no-cache`); the ETag keeps that to a 304.
    fn respond(&self, request: &HeaderMap) -> Response {
        let etag = HeaderValue::from_str(&self.etag).expect("hex is a valid header value");
        let cached = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| tag.trim() == self.etag || tag.trim() == "*");
        let headers = [
            (header::ETAG, etag),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ];
        if cached {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        (headers, [(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type))], self.bytes)
            .into_response()
    }
}

static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_bytes!("../../web/dist/index.html"), "text/html; charset=utf-8"));
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(include_bytes!("../../web/dist/assets/app.js"), "text/javascript; charset=utf-8")
});
static STYLE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(include_bytes!("../../web/dist/assets/style.css"), "text/css; charset=utf-8")
});

/// GET /: the demo page.
pub async fn index(request: HeaderMap) -> Response {
    let mut response = INDEX.respond(&request);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// GET /assets/{file}: the page's script and stylesheet.
pub async fn asset(Path(file): Path<String>, request: HeaderMap) -> Response {
    match file.as_str() {
        "app.js" => SCRIPT.respond(&request),
        "style.css" => STYLE.respond(&request),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
