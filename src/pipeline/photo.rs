//! The photo stage: read the photo from where the request says, then decode it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use image::RgbImage;

use super::{RunContext, record_ms};
use crate::core::{Failure, FailureCode, PhotoSource};
use crate::fetch::{FetchError, Fetcher};
use crate::inference::vision::decode_image;
use crate::storage::ObjectStore;

/// Where photos are read from: the service's own object store, or the SSRF-safe fetcher.
pub struct PhotoSources {
    /// The object store uploads and generated images live in.
    pub store: Arc<dyn ObjectStore>,
    /// Downloads from the internet.
    pub fetcher: Fetcher,
    /// Largest photo accepted, in bytes.
    pub max_image_bytes: u64,
    /// Largest photo accepted, in pixels (checked from the header, before decoding).
    pub max_image_pixels: u64,
}

impl PhotoSources {
    /// The photo's bytes, timed as the "fetch" stage.
    pub async fn read(
        &self,
        source: &PhotoSource,
        ctx: &RunContext,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<Bytes, Failure> {
        ctx.progress("fetch", 0, 1);
        let started = Instant::now();
        let bytes = self.read_image(source, "photo").await?;
        record_ms(timings, "fetch", started);
        ctx.check()?;
        Ok(bytes)
    }

    /// The bytes of the image at `source`, failures naming it as `what` ("photo", "mask").
    pub async fn read_image(&self, source: &PhotoSource, what: &str) -> Result<Bytes, Failure> {
        match source {
            PhotoSource::Stored { key } => self.read_stored(key, what).await,
            PhotoSource::Url(url) => match self.store.key_for_url(url) {
                Some(key) => self.read_stored(&key, what).await,
                None => self.download(url, what).await,
            },
        }
    }

    /// The URL the result reports as `initial_image_url`: the request's own, or for a photo in the
    /// service's store (handed in, uploaded, or named by its `s3://` URL) the store's URL of it, in
    /// the form of `processed_image_url`.
    pub async fn url(&self, source: &PhotoSource) -> Result<String, Failure> {
        let key = match source {
            PhotoSource::Url(url) => match self.store.key_for_url(url) {
                Some(key) => key,
                None => return Ok(url.clone()),
            },
            PhotoSource::Stored { key } => key.clone(),
        };
        self.store.url_for(&key).await.map_err(|e| {
            Failure::new(FailureCode::ImageFetchFailed, format!("Cannot name the stored photo: {e}"))
        })
    }

    async fn read_stored(&self, key: &str, what: &str) -> Result<Bytes, Failure> {
        self.store.get(key, self.max_image_bytes).await.map_err(|e| {
            Failure::new(FailureCode::ImageFetchFailed, format!("Cannot read the {what} from storage: {e}"))
        })
    }

    async fn download(&self, url: &str, what: &str) -> Result<Bytes, Failure> {
        let fetched = self.fetcher.fetch(url).await.map_err(|e| {
            let code = match e {
                FetchError::NotImage { .. } => FailureCode::InvalidImage,
                _ => FailureCode::ImageFetchFailed,
            };
            Failure::new(code, format!("Cannot fetch the {what}: {e}"))
        })?;
        Ok(fetched.bytes)
    }
}

/// Decodes the photo (EXIF orientation applied, size checked), timed as the "decode" stage.
pub async fn decode(
    bytes: Bytes,
    max_pixels: u64,
    timings: &mut BTreeMap<String, f64>,
) -> Result<RgbImage, Failure> {
    let started = Instant::now();
    let decoded = tokio::task::spawn_blocking(move || decode_image(&bytes, max_pixels))
        .await
        .map_err(|e| Failure::new(FailureCode::Internal, e.to_string()))?
        .map_err(|e| Failure::new(FailureCode::InvalidImage, format!("The photo cannot be used: {e}")))?;
    record_ms(timings, "decode", started);
    Ok(decoded)
}
