//! Images in an S3 bucket, or on any S3-compatible server, through aws-sdk-s3.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Builder as S3ConfigBuilder, Region};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use bytes::{Bytes, BytesMut};
use percent_encoding::percent_decode_str;
use rand::Rng;
use reqwest::Url;

use super::{ObjectStore, Peek, PresignedPut, StorageConfig, StorageError, check_key, content_type, record};

/// The region used when neither the flag nor the AWS configuration chain names one.
const FALLBACK_REGION: &str = "us-east-1";

/// Images in one S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    region: String,
    endpoint: Option<Url>,
    force_path_style: bool,
    public_base_url: Option<Url>,
    presign_ttl: Option<Duration>,
    upload_attempts: u32,
    retry_backoff: Duration,
}

impl S3Store {
    /// Connects with credentials and region from the standard AWS chain (environment, shared
    /// profile, SSO, web identity, container and instance metadata), overridden by `config`.
    pub async fn from_environment(config: &StorageConfig) -> Result<Self, StorageError> {
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
        if let Some(region) = &config.s3_region {
            loader = loader.region(Region::new(region.clone()));
        }
        S3Store::new(config, &loader.load().await)
    }

    /// Connects with the credentials, region and HTTP client of `sdk`, overridden by `config`.
    pub fn new(config: &StorageConfig, sdk: &SdkConfig) -> Result<Self, StorageError> {
        let bucket =
            config.s3_bucket.clone().filter(|bucket| !bucket.is_empty()).ok_or_else(|| {
                StorageError::Config("--s3-bucket is required with --object-store s3".into())
            })?;
        let region = config
            .s3_region
            .clone()
            .or_else(|| sdk.region().map(|region| region.to_string()))
            .unwrap_or_else(|| FALLBACK_REGION.into());
        let parse = |flag: &str, text: &str| {
            Url::parse(text).map_err(|e| StorageError::Config(format!("{flag} {text:?}: {e}")))
        };
        let endpoint = config.s3_endpoint.as_deref().map(|text| parse("--s3-endpoint", text)).transpose()?;
        let public_base_url = config
            .s3_public_base_url
            .as_deref()
            .map(|text| parse("--s3-public-base-url", text))
            .transpose()?;
        if let Some(ttl) = config.s3_presign_ttl {
            PresigningConfig::expires_in(ttl)
                .map_err(|e| StorageError::Config(format!("--s3-presign-ttl: {}", DisplayErrorContext(e))))?;
        }
        let mut builder = S3ConfigBuilder::from(sdk)
            .region(Region::new(region.clone()))
            .force_path_style(config.s3_force_path_style)
            .timeout_config(TimeoutConfig::builder().operation_attempt_timeout(config.s3_timeout).build());
        if let Some(endpoint) = &endpoint {
            builder = builder.endpoint_url(endpoint.as_str().trim_end_matches('/'));
        }
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket,
            region,
            endpoint,
            force_path_style: config.s3_force_path_style,
            public_base_url,
            presign_ttl: config.s3_presign_ttl,
            upload_attempts: config.s3_upload_attempts.max(1),
            retry_backoff: config.s3_retry_backoff,
        })
    }

    /// The bucket images go to.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The permanent URL of `key`: public base URL, custom endpoint, or the AWS virtual-hosted form.
    fn public_url(&self, key: &str) -> String {
        let (mut url, bucket_in_path) = match (&self.public_base_url, &self.endpoint) {
            (Some(base), _) => (base.clone(), false),
            (None, Some(endpoint)) if self.force_path_style => (endpoint.clone(), true),
            (None, Some(endpoint)) => {
                let mut url = endpoint.clone();
                let host = format!("{}.{}", self.bucket, endpoint.host_str().unwrap_or_default());
                if url.set_host(Some(&host)).is_err() {
                    return format!("{}/{}/{key}", endpoint.as_str().trim_end_matches('/'), self.bucket);
                }
                (url, false)
            }
            (None, None) => {
                let text = format!("https://{}.s3.{}.amazonaws.com/", self.bucket, self.region);
                match Url::parse(&text) {
                    Ok(url) => (url, false),
                    Err(_) => return format!("{text}{key}"),
                }
            }
        };
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty();
            if bucket_in_path {
                segments.push(&self.bucket);
            }
            segments.extend(key.split('/'));
        }
        url.into()
    }

    async fn put_once(
        &self,
        key: &str,
        body: &Bytes,
    ) -> Result<(), SdkError<aws_sdk_s3::operation::put_object::PutObjectError>> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type(key))
            .cache_control("public, max-age=31536000, immutable")
            .body(ByteStream::from(body.clone()))
            .customize()
            // Retries happen in `put_image`, where they are counted and logged.
            .config_override(S3ConfigBuilder::default().retry_config(RetryConfig::disabled()))
            .send()
            .await
            .map(|_| ())
    }

    fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponential = self.retry_backoff.saturating_mul(1 << failed_attempts.saturating_sub(1).min(16));
        // Equal jitter: half fixed, half random, so retries from many workers spread out.
        exponential / 2 + exponential.mul_f64(rand::rng().random_range(0.0..0.5))
    }
}

/// Whether a failed request may succeed when repeated.
fn retryable<E>(error: &SdkError<E>) -> bool {
    match error {
        SdkError::ConstructionFailure(_) => false,
        SdkError::DispatchFailure(failure) => !failure.is_user(),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            status >= 500 || status == 408 || status == 429
        }
        _ => true,
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn put_image(&self, key: &str, image: Bytes) -> Result<String, StorageError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.put_once(key, &image).await {
                Ok(()) => {
                    record("s3", "put", true);
                    return self.url_for(key).await;
                }
                Err(error) => error,
            };
            record("s3", "put", false);
            let reason = DisplayErrorContext(&error).to_string();
            if attempt >= self.upload_attempts || !retryable(&error) {
                tracing::error!(bucket = %self.bucket, key, attempt, %reason, "S3 upload failed");
                return Err(StorageError::Upload { key: key.to_owned(), attempts: attempt, reason });
            }
            let delay = self.backoff(attempt);
            tracing::warn!(bucket = %self.bucket, key, attempt, ?delay, %reason, "S3 upload failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn get(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        let read_error = |reason: String| StorageError::Read { key: key.to_owned(), reason };
        let response = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(response) => response,
            Err(error) => {
                record("s3", "get", false);
                if error.as_service_error().is_some_and(|e| e.is_no_such_key()) {
                    return Err(StorageError::NotFound { key: key.to_owned() });
                }
                return Err(read_error(DisplayErrorContext(&error).to_string()));
            }
        };
        let too_large = || StorageError::TooLarge { key: key.to_owned(), limit: max_bytes };
        if response.content_length().is_some_and(|length| length as u64 > max_bytes) {
            return Err(too_large());
        }
        let mut body = response.body;
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| read_error(DisplayErrorContext(&e).to_string()))?;
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        record("s3", "get", true);
        Ok(bytes.freeze())
    }

    async fn peek(&self, key: &str, len: u64) -> Result<Peek, StorageError> {
        let read_error = |reason: String| StorageError::Read { key: key.to_owned(), reason };
        let head = self.client.head_object().bucket(&self.bucket).key(key).send().await;
        record("s3", "head", head.is_ok());
        let head = head.map_err(|error| {
            if error.as_service_error().is_some_and(|e| e.is_not_found()) {
                StorageError::NotFound { key: key.to_owned() }
            } else {
                read_error(DisplayErrorContext(&error).to_string())
            }
        })?;
        let size = head.content_length().unwrap_or_default().max(0) as u64;
        let wanted = len.min(size);
        if wanted == 0 {
            return Ok(Peek { size, head: Bytes::new() });
        }
        let range = format!("bytes=0-{}", wanted - 1);
        let response = self.client.get_object().bucket(&self.bucket).key(key).range(range).send().await;
        record("s3", "get", response.is_ok());
        let response = response.map_err(|e| read_error(DisplayErrorContext(&e).to_string()))?;
        let mut body = response.body;
        let mut bytes = BytesMut::with_capacity(wanted as usize);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| read_error(DisplayErrorContext(&e).to_string()))?;
            let room = wanted as usize - bytes.len();
            bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok(Peek { size, head: bytes.freeze() })
    }

    async fn url_for(&self, key: &str) -> Result<String, StorageError> {
        let Some(ttl) = self.presign_ttl else { return Ok(self.public_url(key)) };
        let presigning = PresigningConfig::expires_in(ttl)
            .map_err(|e| StorageError::Config(DisplayErrorContext(e).to_string()))?;
        let request =
            self.client.get_object().bucket(&self.bucket).key(key).presigned(presigning).await.map_err(
                |e| StorageError::Config(format!("cannot presign {key}: {}", DisplayErrorContext(e))),
            )?;
        Ok(request.uri().to_owned())
    }

    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        ttl: Duration,
    ) -> Result<Option<PresignedPut>, StorageError> {
        check_key(key)?;
        let presigning = PresigningConfig::expires_in(ttl)
            .map_err(|e| StorageError::Config(DisplayErrorContext(e).to_string()))?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .presigned(presigning)
            .await
            .map_err(|e| StorageError::Config(format!("cannot presign {key}: {}", DisplayErrorContext(e))))?;
        let headers = request.headers().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        Ok(Some(PresignedPut { url: request.uri().to_owned(), headers }))
    }

    fn reference(&self, key: &str) -> Result<String, StorageError> {
        check_key(key)?;
        Ok(format!("s3://{}/{key}", self.bucket))
    }

    fn key_for_url(&self, url: &str) -> Option<String> {
        let url = Url::parse(url).ok()?;
        let host = url.host_str()?;
        let path = url.path().strip_prefix('/')?;
        let in_path =
            |path: &str| path.strip_prefix(self.bucket.as_str())?.strip_prefix('/').map(str::to_owned);
        let key = if url.scheme() == "s3" {
            (host == self.bucket).then(|| path.to_owned())
        } else if let Some(rest) = self.public_base_url.as_ref().and_then(|base| {
            url.as_str().strip_prefix(base.as_str().trim_end_matches('/'))?.strip_prefix('/')
        }) {
            Some(rest.split(['?', '#']).next().unwrap_or_default().to_owned())
        } else if let Some(endpoint) = self.endpoint.as_ref().filter(|e| same_origin_port(e, &url)) {
            let endpoint_host = endpoint.host_str()?;
            if host == endpoint_host {
                in_path(path)
            } else {
                (host.strip_suffix(endpoint_host)?.strip_suffix('.')? == self.bucket).then(|| path.to_owned())
            }
        } else if let Some(service) = host.strip_suffix(".amazonaws.com") {
            if is_s3_service(service) {
                in_path(path)
            } else {
                let service = service.strip_prefix(self.bucket.as_str())?.strip_prefix('.')?;
                is_s3_service(service).then(|| path.to_owned())
            }
        } else {
            None
        }?;
        let key = percent_decode_str(&key).decode_utf8().ok()?.into_owned();
        (!key.is_empty()).then_some(key)
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.client.head_bucket().bucket(&self.bucket).send().await.map_err(|e| {
            StorageError::Unavailable(format!("bucket {}: {}", self.bucket, DisplayErrorContext(e)))
        })?;
        Ok(())
    }
}

/// `s3`, `s3.<region>`, `s3-<region>` or `s3.dualstack.<region>`: the S3 part of an AWS host name.
fn is_s3_service(service: &str) -> bool {
    service == "s3" || service.starts_with("s3.") || service.starts_with("s3-")
}

fn same_origin_port(endpoint: &Url, url: &Url) -> bool {
    endpoint.scheme() == url.scheme() && endpoint.port_or_known_default() == url.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(endpoint: Option<&str>, public: Option<&str>, path_style: bool) -> S3Store {
        let config = StorageConfig {
            s3_bucket: Some("desk-bucket".into()),
            s3_region: Some("ap-northeast-2".into()),
            s3_endpoint: endpoint.map(Into::into),
            s3_public_base_url: public.map(Into::into),
            s3_force_path_style: path_style,
            ..StorageConfig::default()
        };
        let sdk = SdkConfig::builder().behavior_version(BehaviorVersion::latest()).build();
        S3Store::new(&config, &sdk).unwrap()
    }

    #[test]
    fn public_urls() {
        let key = "images/2026/11/26/a.png";
        assert_eq!(
            store(None, None, false).public_url(key),
            "https://desk-bucket.s3.ap-northeast-2.amazonaws.com/images/2026/11/26/a.png"
        );
        assert_eq!(
            store(Some("http://127.0.0.1:9000"), None, true).public_url(key),
            "http://127.0.0.1:9000/desk-bucket/images/2026/11/26/a.png"
        );
        assert_eq!(
            store(Some("https://storage.example.com"), None, false).public_url(key),
            "https://desk-bucket.storage.example.com/images/2026/11/26/a.png"
        );
        assert_eq!(
            store(None, Some("https://cdn.example.com/desk/"), false).public_url(key),
            "https://cdn.example.com/desk/images/2026/11/26/a.png"
        );
    }

    #[test]
    fn recognises_urls_into_the_bucket() {
        let aws = store(None, None, false);
        for url in [
            "s3://desk-bucket/uploads/12.png",
            "https://desk-bucket.s3.amazonaws.com/uploads/12.png",
            "https://desk-bucket.s3.ap-northeast-2.amazonaws.com/uploads/12.png",
            "https://desk-bucket.s3-ap-northeast-2.amazonaws.com/uploads/12.png",
            "https://s3.ap-northeast-2.amazonaws.com/desk-bucket/uploads/12.png",
            "https://s3.amazonaws.com/desk-bucket/uploads/12.png?X-Amz-Signature=abc",
        ] {
            assert_eq!(aws.key_for_url(url).as_deref(), Some("uploads/12.png"), "{url}");
        }
        for url in [
            "s3://other-bucket/uploads/12.png",
            "https://other.s3.amazonaws.com/uploads/12.png",
            "https://s3.amazonaws.com/other/uploads/12.png",
            "https://example.com/desk-bucket/uploads/12.png",
            "https://desk-bucket.ec2.amazonaws.com/uploads/12.png",
        ] {
            assert_eq!(aws.key_for_url(url), None, "{url}");
        }
        let custom = store(Some("http://127.0.0.1:9000"), None, true);
        assert_eq!(
            custom.key_for_url("http://127.0.0.1:9000/desk-bucket/a%20b.png").as_deref(),
            Some("a b.png")
        );
        assert_eq!(custom.key_for_url("http://127.0.0.1:9001/desk-bucket/a.png"), None);
        let cdn = store(None, Some("https://cdn.example.com/desk"), false);
        assert_eq!(
            cdn.key_for_url("https://cdn.example.com/desk/images/x.png").as_deref(),
            Some("images/x.png")
        );
    }
}
