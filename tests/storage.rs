//! Object stores against real servers: an S3-compatible server (s3s-fs with SigV4 auth) embedded
//! on 127.0.0.1, and the file store served through its axum router.

use std::net::SocketAddr;
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::config::{Credentials, Region, SharedCredentialsProvider};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use deskgen::storage::{self, ObjectStore, ObjectStoreKind, S3Store, StorageConfig, StorageError};
use tower::ServiceExt;

#[path = "common/s3.rs"]
mod s3;

use s3::{ACCESS_KEY, SECRET_KEY, start_s3};

const BUCKET: &str = "desk-images";
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

fn sdk_config(secret_key: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            ACCESS_KEY, secret_key, None, None, "test",
        )))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build()
}

fn s3_config(addr: SocketAddr, bucket: &str) -> StorageConfig {
    StorageConfig {
        object_store: ObjectStoreKind::S3,
        s3_bucket: Some(bucket.into()),
        s3_region: Some("us-east-1".into()),
        s3_endpoint: Some(format!("http://{addr}")),
        s3_force_path_style: true,
        s3_upload_attempts: 3,
        s3_retry_backoff: Duration::from_millis(10),
        s3_timeout: Duration::from_secs(5),
        ..StorageConfig::default()
    }
}

/// A running server with the bucket created, and a store pointed at it.
async fn s3_fixture(
    config: impl FnOnce(StorageConfig) -> StorageConfig,
) -> (S3Store, SocketAddr, tokio::task::JoinHandle<()>, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(BUCKET)).unwrap();
    let (addr, server) = start_s3(root.path(), "127.0.0.1:0".parse().unwrap()).await;
    let store = S3Store::new(&config(s3_config(addr, BUCKET)), &sdk_config(SECRET_KEY)).unwrap();
    (store, addr, server, root)
}

#[tokio::test]
async fn s3_put_then_get_and_recognise_the_url() {
    let (store, addr, _server, root) = s3_fixture(|c| c).await;
    store.check().await.unwrap();
    let key = storage::new_image_key();
    let url = store.put_image(&key, Bytes::from_static(PNG)).await.unwrap();
    assert_eq!(url, format!("http://{addr}/{BUCKET}/{key}"));
    assert_eq!(std::fs::read(root.path().join(BUCKET).join(&key)).unwrap(), PNG);
    assert_eq!(store.get(&key, 1024).await.unwrap().as_ref(), PNG);
    assert_eq!(store.key_for_url(&url).as_deref(), Some(key.as_str()));
    let s3_url = format!("s3://{BUCKET}/{key}");
    let via_url = store.key_for_url(&s3_url).unwrap();
    assert_eq!(store.get(&via_url, 1024).await.unwrap().as_ref(), PNG);
    let error = store.get(&key, 8).await.unwrap_err();
    assert!(matches!(error, StorageError::TooLarge { limit: 8, .. }), "{error}");
}

#[tokio::test]
async fn s3_presigned_urls_download_over_plain_http() {
    let (store, addr, _server, _root) =
        s3_fixture(|c| StorageConfig { s3_presign_ttl: Some(Duration::from_secs(60)), ..c }).await;
    let key = storage::new_image_key();
    let url = store.put_image(&key, Bytes::from_static(PNG)).await.unwrap();
    assert!(url.starts_with(&format!("http://{addr}/{BUCKET}/{key}?")), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), PNG);
    // Without the signature the bucket is private.
    let unsigned = client.get(format!("http://{addr}/{BUCKET}/{key}")).send().await.unwrap();
    assert_eq!(unsigned.status(), 403);
}

#[tokio::test]
async fn s3_missing_object_is_not_found() {
    let (store, _addr, _server, _root) = s3_fixture(|c| c).await;
    let error = store.get("images/2026/01/01/missing.png", 1024).await.unwrap_err();
    assert!(matches!(error, StorageError::NotFound { .. }), "{error}");
}

#[tokio::test]
async fn s3_missing_bucket_is_reported() {
    let (_store, addr, _server, _root) = s3_fixture(|c| c).await;
    let store = S3Store::new(&s3_config(addr, "no-such-bucket"), &sdk_config(SECRET_KEY)).unwrap();
    // The health check is where a missing bucket shows (s3s-fs, unlike S3, creates it on upload).
    let error = store.check().await.unwrap_err();
    assert!(matches!(error, StorageError::Unavailable(_)), "{error}");
    assert!(error.to_string().contains("no-such-bucket"), "{error}");
}

#[tokio::test]
async fn s3_wrong_credentials_fail_without_retrying() {
    let (_store, addr, _server, _root) = s3_fixture(|c| c).await;
    let store = S3Store::new(&s3_config(addr, BUCKET), &sdk_config("not-the-secret")).unwrap();
    let error = store.put_image(&storage::new_image_key(), Bytes::from_static(PNG)).await.unwrap_err();
    assert!(matches!(error, StorageError::Upload { attempts: 1, .. }), "{error}");
}

#[tokio::test]
async fn s3_upload_retries_then_fails_when_the_server_stops() {
    let (store, _addr, server, _root) = s3_fixture(|c| c).await;
    store.put_image(&storage::new_image_key(), Bytes::from_static(PNG)).await.unwrap();
    server.abort();
    let _ = server.await;
    let error = store.put_image(&storage::new_image_key(), Bytes::from_static(PNG)).await.unwrap_err();
    assert!(matches!(error, StorageError::Upload { attempts: 3, .. }), "{error}");
}

/// The file store built through `storage::build`, served on a real socket.
async fn file_fixture() -> (std::sync::Arc<dyn ObjectStore>, SocketAddr, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = StorageConfig { image_base_url: Some(format!("http://{addr}")), ..StorageConfig::default() };
    let store = storage::build(&config, data_dir.path()).await.unwrap();
    let router = store.router().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (store, addr, data_dir)
}

#[tokio::test]
async fn file_store_serves_images_with_etag_revalidation() {
    let (store, addr, data_dir) = file_fixture().await;
    assert_eq!(store.kind(), "file");
    store.check().await.unwrap();
    let key = storage::new_image_key();
    let url = store.put_image(&key, Bytes::from_static(PNG)).await.unwrap();
    assert_eq!(url, format!("http://{addr}/v1/{key}"));
    assert!(data_dir.path().join(&key).is_file());
    assert_eq!(store.key_for_url(&url).as_deref(), Some(key.as_str()));
    assert_eq!(store.get(&key, 1024).await.unwrap().as_ref(), PNG);

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/png");
    assert!(response.headers()[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
    let etag = response.headers()[header::ETAG].clone();
    assert_eq!(response.bytes().await.unwrap().as_ref(), PNG);

    let revalidated = client.get(&url).header(header::IF_NONE_MATCH, etag.clone()).send().await.unwrap();
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.headers()[header::ETAG], etag);
    assert!(revalidated.bytes().await.unwrap().is_empty());
    let changed = client.get(&url).header(header::IF_NONE_MATCH, "\"other\"").send().await.unwrap();
    assert_eq!(changed.status(), 200);

    let missing = client.get(format!("http://{addr}/v1/images/2026/01/01/none.png")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let error = store.get("images/2026/01/01/none.png", 1024).await.unwrap_err();
    assert!(matches!(error, StorageError::NotFound { .. }), "{error}");
}

#[tokio::test]
async fn file_store_refuses_path_traversal() {
    let (store, _addr, data_dir) = file_fixture().await;
    std::fs::write(data_dir.path().join("secret.txt"), "do not serve").unwrap();
    let router = store.router().unwrap();
    for path in [
        "/v1/images/../secret.txt",
        "/v1/images/%2e%2e/secret.txt",
        "/v1/images/%2E%2E%2Fsecret.txt",
        "/v1/images/..%5csecret.txt",
        "/v1/images//etc/passwd",
        "/v1/images/%2fetc%2fpasswd",
        "/v1/images/2026/./../../secret.txt",
    ] {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert!(response.status().is_client_error(), "{path}: {}", response.status());
    }
    for key in ["images/../secret.txt", "/etc/passwd", "secret.txt"] {
        let error = store.put_image(key, Bytes::from_static(PNG)).await.unwrap_err();
        assert!(matches!(error, StorageError::InvalidKey { .. }), "{key}: {error}");
    }
}
