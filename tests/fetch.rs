//! The SSRF-safe image fetcher against a real HTTP server on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use deskgen::fetch::{FetchConfig, FetchError, Fetcher, UrlPolicy};

/// The 8-byte PNG signature and an IHDR chunk: enough for the magic-byte check.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

async fn image_server() -> SocketAddr {
    let router = Router::new()
        .route("/image.png", get(|| async { ([(header::CONTENT_TYPE, "image/png")], PNG) }))
        .route("/untyped", get(|| async { ([(header::CONTENT_TYPE, "binary/octet-stream")], PNG) }))
        .route(
            "/redirect/{hops}",
            get(|Path(hops): Path<u32>| async move {
                if hops == 0 {
                    Redirect::temporary("/image.png")
                } else {
                    Redirect::temporary(&format!("/redirect/{}", hops - 1))
                }
            }),
        )
        .route(
            "/to-metadata",
            get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
        )
        .route("/to-private", get(|| async { Redirect::temporary("http://10.0.0.1/image.png") }))
        .route(
            "/fake.jpg",
            get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], "<html>not a photo</html>") }),
        )
        .route("/page", get(|| async { ([(header::CONTENT_TYPE, "text/html")], PNG) }))
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route("/endless", get(endless))
        .route("/slow", get(slow));
    serve(router).await
}

/// A PNG that never ends: only a fetcher that stops while streaming gets past it.
async fn endless() -> Response {
    let chunk = bytes::Bytes::from(vec![0u8; 64 * 1024]);
    let head = futures::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(PNG)) });
    let tail = futures::stream::repeat_with(move || Ok(chunk.clone()));
    ([(header::CONTENT_TYPE, "image/png")], Body::from_stream(futures::StreamExt::chain(head, tail)))
        .into_response()
}

async fn slow() -> Response {
    tokio::time::sleep(Duration::from_secs(5)).await;
    ([(header::CONTENT_TYPE, "image/png")], PNG).into_response()
}

/// Loopback allowed (as `--fetch-allow 127.0.0.1 --fetch-allow-http` would), small limits.
fn loopback_fetcher() -> Fetcher {
    Fetcher::new(&FetchConfig {
        allow_http: true,
        allow: vec!["127.0.0.1".parse().unwrap()],
        max_image_bytes: 256 * 1024,
        timeout: Duration::from_secs(2),
        ..FetchConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn fetches_an_image_and_sniffs_its_type() {
    let addr = image_server().await;
    let fetched = loopback_fetcher().fetch(&format!("http://{addr}/image.png")).await.unwrap();
    assert_eq!(fetched.bytes.as_ref(), PNG);
    assert_eq!(fetched.content_type, "image/png");
    let untyped = loopback_fetcher().fetch(&format!("http://{addr}/untyped")).await.unwrap();
    assert_eq!(untyped.content_type, "image/png");
}

#[tokio::test]
async fn follows_up_to_three_redirects() {
    let addr = image_server().await;
    let fetched = loopback_fetcher().fetch(&format!("http://{addr}/redirect/2")).await.unwrap();
    assert_eq!(fetched.final_url.path(), "/image.png");
    let error = loopback_fetcher().fetch(&format!("http://{addr}/redirect/3")).await.unwrap_err();
    assert!(matches!(error, FetchError::TooManyRedirects { max: 3 }), "{error}");
}

#[tokio::test]
async fn redirects_to_blocked_addresses_are_refused() {
    let addr = image_server().await;
    for (path, range) in [("/to-metadata", "cloud metadata"), ("/to-private", "private")] {
        let error = loopback_fetcher().fetch(&format!("http://{addr}{path}")).await.unwrap_err();
        match error {
            FetchError::Blocked(blocked) => assert_eq!(blocked.range, range, "{path}"),
            other => panic!("{path}: {other}"),
        }
    }
}

#[tokio::test]
async fn oversize_bodies_are_cut_off_while_streaming() {
    let addr = image_server().await;
    let error = loopback_fetcher().fetch(&format!("http://{addr}/endless")).await.unwrap_err();
    assert!(matches!(error, FetchError::TooLarge { limit: 262_144 }), "{error}");
}

#[tokio::test]
async fn non_images_are_refused_whatever_the_content_type_says() {
    let addr = image_server().await;
    let error = loopback_fetcher().fetch(&format!("http://{addr}/fake.jpg")).await.unwrap_err();
    assert!(matches!(error, FetchError::NotImage { .. }), "{error}");
    let error = loopback_fetcher().fetch(&format!("http://{addr}/page")).await.unwrap_err();
    assert!(matches!(error, FetchError::NotImage { .. }), "{error}");
}

#[tokio::test]
async fn error_statuses_and_timeouts_are_reported() {
    let addr = image_server().await;
    let error = loopback_fetcher().fetch(&format!("http://{addr}/missing")).await.unwrap_err();
    assert!(matches!(error, FetchError::Status { status: 404, .. }), "{error}");
    let impatient = Fetcher::new(&FetchConfig {
        allow_http: true,
        allow: vec!["127.0.0.1".parse().unwrap()],
        timeout: Duration::from_millis(300),
        ..FetchConfig::default()
    })
    .unwrap();
    let error = impatient.fetch(&format!("http://{addr}/slow")).await.unwrap_err();
    assert!(matches!(error, FetchError::Timeout { .. }), "{error}");
}

/// A listener that only counts connections, to prove refused URLs never connect.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn private_and_local_targets_are_refused_before_connecting() {
    let (port, accepted) = counting_listener().await;
    let fetcher = Fetcher::new(&FetchConfig { allow_http: true, ..FetchConfig::default() }).unwrap();
    for url in [
        format!("http://127.0.0.1:{port}/x.png"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://[::1]:{port}/x.png"),
        "http://10.0.0.1/x.png".to_owned(),
        format!("http://[::ffff:127.0.0.1]:{port}/x.png"),
        format!("http://localhost:{port}/x.png"),
        format!("http://0x7f.1:{port}/x.png"),
        "http://[fd00:ec2::254]/latest/meta-data/".to_owned(),
    ] {
        let error = fetcher.fetch(&url).await.unwrap_err();
        assert!(matches!(error, FetchError::Blocked(_)), "{url}: {error}");
    }
    for url in ["file:///etc/passwd".to_owned(), format!("gopher://127.0.0.1:{port}/")] {
        let error = fetcher.fetch(&url).await.unwrap_err();
        assert!(matches!(error, FetchError::Scheme { .. }), "{url}: {error}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn plain_http_needs_to_be_allowed() {
    let fetcher = Fetcher::new(&FetchConfig::default()).unwrap();
    let error = fetcher.fetch("http://example.com/x.png").await.unwrap_err();
    assert!(matches!(error, FetchError::Scheme { .. }), "{error}");
}

#[tokio::test]
async fn allow_rules_by_host_name_and_policy_resolution() {
    let addr = image_server().await;
    let by_name = Fetcher::new(&FetchConfig {
        allow_http: true,
        allow: vec!["localhost".parse().unwrap()],
        ..FetchConfig::default()
    })
    .unwrap();
    let fetched = by_name.fetch(&format!("http://localhost:{}/image.png", addr.port())).await.unwrap();
    assert_eq!(fetched.content_type, "image/png");

    let strict = UrlPolicy::new(false, Vec::new());
    let url = "https://localhost/hook".parse().unwrap();
    assert!(matches!(strict.resolve(&url).await, Err(FetchError::Blocked(_))));
}
