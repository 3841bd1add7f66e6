//! Image URLs → image bytes: `data:` URIs always (decoded under the image byte limit), `http(s)://` URLs only when
//! `http.fetch_urls` is on ([`super::fetch`]). The bytes then go through the pipeline's image checks like any
//! gRPC image (format from the magic bytes, dimensions from the header).

use std::sync::Arc;

use base64::Engine as _;
use kosmos_proto::v1 as pb;

use super::convert::SegmentSource;
use super::error::ApiError;
use super::fetch::{FetchError, fetch};
use crate::config::FetchConfig;

/// An image as the request names it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSource {
    url: String,
    path: String,
}

impl ImageSource {
    /// The image at `url`, named `path` in error messages.
    pub fn new(url: &str, path: String) -> Self {
        Self {
            url: url.trim().to_string(),
            path,
        }
    }

    fn is_data(&self) -> bool {
        self.url
            .get(..5)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"))
    }
}

/// How a request's images are read.
#[derive(Debug, Clone)]
pub struct ImageSources {
    /// URL fetching.
    pub fetch: FetchConfig,
    /// `limits.max_image_bytes`.
    pub max_image_bytes: u64,
    /// The TLS client of `https://` fetches ([`super::fetch::client_tls`]).
    pub tls: Arc<rustls::ClientConfig>,
}

impl ImageSources {
    /// Refuses a request naming more URLs than `http.fetch_max_urls` (before any is fetched).
    pub fn check_count(&self, parts: &[SegmentSource]) -> Result<(), ApiError> {
        let urls = parts
            .iter()
            .filter(|part| matches!(part, SegmentSource::Image(source) if !source.is_data()))
            .count();
        if self.fetch.enabled && urls > self.fetch.max_urls {
            return Err(ApiError::bad_request(format!(
                "`messages` names {urls} image URLs, above the limit `http.fetch_max_urls` = {}",
                self.fetch.max_urls
            )));
        }
        Ok(())
    }

    /// The image's bytes (and the MIME type a `data:` URI declares).
    pub async fn read(&self, source: ImageSource) -> Result<pb::Image, ApiError> {
        if source.is_data() {
            return decode_data_uri(&source, self.max_image_bytes);
        }
        let scheme = source
            .url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(ApiError::bad_request(format!(
                "`{}.url` must be a data: URI or an http(s) URL",
                source.path
            )));
        }
        if !self.fetch.enabled {
            return Err(ApiError::bad_request(format!(
                "`{}.url`: this server does not fetch image URLs (`http.fetch_urls` is off); send the image \
                 inline as a data: URI (data:image/png;base64,…)",
                source.path
            )));
        }
        match fetch(&source.url, &self.fetch, &self.tls, self.max_image_bytes).await {
            Ok(data) => Ok(pb::Image {
                data,
                mime_type: String::new(),
            }),
            Err(FetchError::TooLarge { bytes }) => Err(ApiError::too_large(format!(
                "`{}.url` is {bytes}, above the limit `limits.max_image_bytes` = {}",
                source.path, self.max_image_bytes
            ))),
            Err(err) => Err(ApiError::bad_request(format!(
                "`{}.url` could not be fetched: {err}",
                source.path
            ))),
        }
    }
}

/// `data:[<media type>][;base64],<data>`; only base64 data (images are binary).
fn decode_data_uri(source: &ImageSource, max_image_bytes: u64) -> Result<pb::Image, ApiError> {
    let field = format!("{}.url", source.path);
    let rest = &source.url[5..];
    let Some((header, data)) = rest.split_once(',') else {
        return Err(ApiError::bad_request(format!(
            "`{field}` is not a data: URI (no comma before the data)"
        )));
    };
    let mut attributes = header.split(';');
    let media_type = attributes
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if !attributes.any(|attribute| attribute.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be base64 data (data:image/png;base64,…)"
        )));
    }
    let data = data.trim();
    // 4 characters carry 3 bytes: refuse a body that cannot fit before decoding it.
    let most_bytes = (data.len() as u64).div_ceil(4) * 3;
    if most_bytes > max_image_bytes + 2 {
        return Err(ApiError::too_large(format!(
            "`{field}` holds about {most_bytes} bytes, above the limit `limits.max_image_bytes` = \
             {max_image_bytes}"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|err| ApiError::bad_request(format!("`{field}` is not valid base64: {err}")))?;
    if bytes.len() as u64 > max_image_bytes {
        return Err(ApiError::too_large(format!(
            "`{field}` holds {} bytes, above the limit `limits.max_image_bytes` = {max_image_bytes}",
            bytes.len()
        )));
    }
    Ok(pb::Image {
        data: bytes,
        // Only image types are passed on (the pipeline checks them against the bytes); anything else, such as
        // application/octet-stream, leaves the format to the bytes.
        mime_type: if media_type.starts_with("image/") {
            media_type
        } else {
            String::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(url: &str) -> ImageSource {
        ImageSource::new(url, "messages[0].content[0].image_url".into())
    }

    #[test]
    fn data_uris_decode_and_keep_an_image_media_type() {
        let image = decode_data_uri(&source("data:image/png;base64,aGVsbG8="), 100).expect("valid");
        assert_eq!(image.data, b"hello");
        assert_eq!(image.mime_type, "image/png");
        let image = decode_data_uri(
            &source("data:application/octet-stream;base64,aGVsbG8="),
            100,
        )
        .expect("valid");
        assert_eq!(image.mime_type, "");
    }

    #[test]
    fn bad_or_large_data_uris_are_refused_by_name() {
        let err = decode_data_uri(&source("data:image/png,hello"), 100).expect_err("not base64");
        assert_eq!(
            err.param.as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
        let err =
            decode_data_uri(&source("data:image/png;base64,!!!!"), 100).expect_err("bad base64");
        assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
        let err = decode_data_uri(&source("data:image/png;base64,aGVsbG8gd29ybGQ="), 4)
            .expect_err("too large");
        assert_eq!(err.status, http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            err.message.contains("limits.max_image_bytes"),
            "{}",
            err.message
        );
    }
}
