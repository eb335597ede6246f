//! Downloading user-supplied URLs without letting them reach into our own network (SSRF).
//!
//! Every URL passes [`UrlPolicy`]: an allowed scheme, then a host whose addresses are all public.
//! Host names are checked inside the HTTP client's DNS resolver, so the address a connection is
//! opened to is the address that was checked (no DNS rebinding between check and connect).
//! Redirects are followed by hand, each hop checked again. Webhook delivery uses the same policy.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};

/// Default cap on a downloaded image: 20 MB.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 20_000_000;

/// The AWS/GCP/Azure instance metadata address.
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The AWS instance metadata address on IPv6 (Nitro).
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// How user-supplied URLs are downloaded.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Allow plain http:// image and webhook URLs (https only otherwise).
    pub allow_http: bool,
    /// Host name, address or CIDR that may be reached although it is private (repeatable, or comma-separated).
    pub allow: Vec<AllowRule>,
    /// Largest image download, in bytes; bigger bodies are cut off while streaming.
    pub max_image_bytes: u64,
    /// Time allowed to open one connection (e.g. 5s).
    pub connect_timeout: Duration,
    /// Time allowed for a whole download, redirects and body included (e.g. 30s).
    pub timeout: Duration,
    /// Redirects followed before giving up.
    pub max_redirects: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            allow_http: false,
            allow: Vec::new(),
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            max_redirects: 3,
        }
    }
}

/// Why a download was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The text is not an absolute URL with a host.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The scheme is not https (or http where allowed).
    #[error("URL scheme {scheme:?} is not allowed (allowed: {allowed})")]
    Scheme { scheme: String, allowed: &'static str },
    /// The host is, or resolves to, an address inside a private or special-purpose range.
    #[error(transparent)]
    Blocked(#[from] BlockedAddress),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// More redirects than allowed.
    #[error("too many redirects (more than {max})")]
    TooManyRedirects { max: usize },
    /// A redirect without a usable Location header.
    #[error("redirect from {url} has no usable Location header")]
    BadRedirect { url: String },
    /// The server answered with a non-success status.
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// The body is bigger than the configured limit.
    #[error("image is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// The body is not one of the image formats we accept.
    #[error("not an image: {reason}")]
    NotImage { reason: String },
    /// The download did not finish in time.
    #[error("download timed out after {}", humantime::format_duration(*after))]
    Timeout { after: Duration },
    /// Connecting or reading failed.
    #[error("cannot download {url}: {reason}")]
    Transport { url: String, reason: String },
    /// The HTTP client could not be set up (TLS backend).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A refused address, with the range it falls in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {ip} of {host} is {range}: not allowed")]
pub struct BlockedAddress {
    /// The host as written in the URL.
    pub host: String,
    /// The offending address.
    pub ip: IpAddr,
    /// The special-purpose range it belongs to, e.g. "loopback".
    pub range: &'static str,
}

/// One `--fetch-allow` entry: a host name, or an address range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// A host name, compared case-insensitively; every address it resolves to is allowed.
    Host(String),
    /// An address or CIDR range.
    Network(IpNet),
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let bare = text.trim_start_matches('[').trim_end_matches(']');
        if let Ok(net) = bare.parse::<IpNet>() {
            return Ok(AllowRule::Network(net.trunc()));
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(AllowRule::Network(IpNet::from(ip)));
        }
        let host = normalize_host(text);
        let valid = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if valid {
            Ok(AllowRule::Host(host))
        } else {
            Err(format!("not a host name, address or CIDR: {text:?}"))
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::Host(host) => f.write_str(host),
            AllowRule::Network(net) => write!(f, "{net}"),
        }
    }
}

/// Which URLs may be fetched: scheme allow-list plus the address checks.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    allow_http: bool,
    allow: Arc<[AllowRule]>,
}

impl UrlPolicy {
    /// A policy allowing https (and http when `allow_http`), and the private hosts in `allow`.
    pub fn new(allow_http: bool, allow: Vec<AllowRule>) -> Self {
        UrlPolicy { allow_http, allow: allow.into() }
    }

    /// The policy `--fetch-allow-http` and `--fetch-allow` describe.
    pub fn from_config(config: &FetchConfig) -> Self {
        UrlPolicy::new(config.allow_http, config.allow.clone())
    }

    /// Parses `text` and runs the checks that need no DNS: scheme, host, literal addresses.
    pub fn parse(&self, text: &str) -> Result<Url, FetchError> {
        let url = Url::parse(text)
            .map_err(|e| FetchError::InvalidUrl { url: text.to_owned(), reason: e.to_string() })?;
        self.check_url(&url)?;
        Ok(url)
    }

    /// The checks that need no DNS: scheme, host present, literal addresses public or allowed.
    pub fn check_url(&self, url: &Url) -> Result<(), FetchError> {
        let scheme_ok = match url.scheme() {
            "https" => true,
            "http" => self.allow_http,
            _ => false,
        };
        if !scheme_ok {
            let allowed = if self.allow_http { "https, http" } else { "https" };
            return Err(FetchError::Scheme { scheme: url.scheme().to_owned(), allowed });
        }
        match url.host() {
            None => Err(FetchError::InvalidUrl { url: url.to_string(), reason: "no host".into() }),
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }

    /// Every check, DNS included; returns the addresses the host resolved to.
    ///
    /// Useful to reject a URL when it is submitted. A later connection resolves again and is
    /// checked again, so a name that changes its answer in between gains nothing.
    pub async fn resolve(&self, url: &Url) -> Result<Vec<SocketAddr>, FetchError> {
        self.check_url(url)?;
        let port = url.port_or_known_default().unwrap_or(443);
        match url.host() {
            Some(url::Host::Ipv4(ip)) => Ok(vec![SocketAddr::new(IpAddr::V4(ip), port)]),
            Some(url::Host::Ipv6(ip)) => Ok(vec![SocketAddr::new(IpAddr::V6(ip), port)]),
            Some(url::Host::Domain(host)) => self.resolve_host(host, port).await,
            None => Err(FetchError::InvalidUrl { url: url.to_string(), reason: "no host".into() }),
        }
    }

    /// An HTTP client builder whose connections obey this policy: checked DNS answers, no
    /// automatic redirects, no proxy (a proxy would resolve the name itself, unchecked).
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver { policy: self.clone() }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("deskgen/", env!("CARGO_PKG_VERSION")))
    }

    async fn resolve_host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, FetchError> {
        let host = normalize_host(host);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| FetchError::Resolve { host: host.clone(), reason: e.to_string() })?
            .collect();
        if addrs.is_empty() {
            return Err(FetchError::Resolve { host, reason: "no addresses".into() });
        }
        if !self.host_allowed(&host) {
            // One bad address is enough to refuse: the client may pick any of them.
            for addr in &addrs {
                self.check_ip(&host, addr.ip())?;
            }
        }
        Ok(addrs)
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.allow.iter().any(|rule| matches!(rule, AllowRule::Host(allowed) if allowed == host))
    }

    fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), FetchError> {
        let Some(range) = special_range(ip) else { return Ok(()) };
        let canonical = ip.to_canonical();
        let allowed = self.allow.iter().any(|rule| match rule {
            AllowRule::Network(net) => net.contains(&ip) || net.contains(&canonical),
            AllowRule::Host(_) => false,
        });
        if allowed { Ok(()) } else { Err(BlockedAddress { host: host.to_owned(), ip, range }.into()) }
    }
}

/// The DNS resolver installed in policy-bound HTTP clients.
struct CheckedResolver {
    policy: UrlPolicy,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            // Port 0: the client fills in the URL's port.
            let addrs = policy
                .resolve_host(name.as_str(), 0)
                .await
                .map_err(|refused| Box::new(refused) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The special-purpose range `ip` belongs to, or `None` for a public unicast address.
fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_range_v4(v4),
        IpAddr::V6(v6) => special_range_v6(v6),
    }
}

fn special_range_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let range = match (a, b, c) {
        _ if ip == METADATA_V4 => "cloud metadata",
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "carrier-grade NAT",
        (192, 0, 0) => "IETF protocol assignments",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, _, _) => "multicast",
        _ if ip.is_broadcast() => "broadcast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    };
    Some(range)
}

fn special_range_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip == METADATA_V6 {
        return Some("cloud metadata");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // Forms that carry an IPv4 address the packet ends up at: judge that address.
    if let Some(v4) = embedded_v4(ip) {
        return special_range_v4(v4);
    }
    let s = ip.segments();
    let range = match s[0] {
        0x2001 if s[1] == 0 => "Teredo",
        0x2001 if s[1] == 0x0db8 => "documentation",
        0x2001 if s[1] == 2 && s[2] == 0 => "benchmarking",
        0x2001 if (0x10..=0x2f).contains(&s[1]) => "ORCHID",
        0x0064 if s[1] == 0xff9b && s[2] == 1 => "local-use NAT64",
        0x3fff if s[1] < 0x1000 => "documentation",
        x if x & 0xfe00 == 0xfc00 => "unique local (private)",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xffc0 == 0xfec0 => "site-local",
        x if x & 0xff00 == 0xff00 => "multicast",
        // Everything outside 2000::/3 is unassigned or reserved.
        x if x & 0xe000 != 0x2000 => "reserved",
        _ => return None,
    };
    Some(range)
}

/// The IPv4 address inside an IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96) or 6to4 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(low),
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)),
        _ => None,
    }
}

/// The image format `bytes` starts with, as a MIME type.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    let mime = match bytes {
        [0xff, 0xd8, 0xff, ..] => "image/jpeg",
        [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, ..] => "image/png",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => "image/gif",
        [b'B', b'M', ..] if bytes.len() >= 26 => "image/bmp",
        [b'I', b'I', 0x2a, 0x00, ..] | [b'M', b'M', 0x00, 0x2a, ..] => "image/tiff",
        _ => return None,
    };
    Some(mime)
}

/// A downloaded image.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The body.
    pub bytes: Bytes,
    /// The MIME type the body's magic bytes identify.
    pub content_type: &'static str,
    /// The URL the body came from, after redirects.
    pub final_url: Url,
}

/// Downloads images from user-supplied URLs under a [`UrlPolicy`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: UrlPolicy,
    max_bytes: u64,
    timeout: Duration,
    max_redirects: usize,
}

impl Fetcher {
    /// A fetcher with the given limits.
    pub fn new(config: &FetchConfig) -> Result<Self, FetchError> {
        let policy = UrlPolicy::from_config(config);
        let client = policy
            .client_builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| FetchError::Client(error_chain(&e)))?;
        Ok(Fetcher {
            client,
            policy,
            max_bytes: config.max_image_bytes,
            timeout: config.timeout,
            max_redirects: config.max_redirects,
        })
    }

    /// The URL rules this fetcher applies.
    pub fn policy(&self) -> &UrlPolicy {
        &self.policy
    }

    /// Downloads `url`, following up to the configured number of redirects, and checks that the
    /// body is an image no bigger than the limit.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let url = self.policy.parse(url)?;
        tokio::time::timeout(self.timeout, self.fetch_following(url))
            .await
            .map_err(|_| FetchError::Timeout { after: self.timeout })?
    }

    async fn fetch_following(&self, mut url: Url) -> Result<Fetched, FetchError> {
        let mut redirects = 0;
        loop {
            self.policy.check_url(&url)?;
            let response = self
                .client
                .get(url.clone())
                .header(reqwest::header::ACCEPT, "image/*")
                .send()
                .await
                .map_err(|e| transport_error(&url, &e))?;
            let status = response.status();
            if status.is_redirection() {
                if redirects == self.max_redirects {
                    return Err(FetchError::TooManyRedirects { max: self.max_redirects });
                }
                redirects += 1;
                url = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|location| location.to_str().ok())
                    .and_then(|location| url.join(location).ok())
                    .ok_or_else(|| FetchError::BadRedirect { url: url.to_string() })?;
                tracing::debug!(%url, "following redirect");
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status { url: url.to_string(), status: status.as_u16() });
            }
            return self.read_image(url, response).await;
        }
    }

    async fn read_image(&self, url: Url, mut response: reqwest::Response) -> Result<Fetched, FetchError> {
        let declared =
            response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let essence = declared.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        // S3 labels uploads without a type binary/octet-stream; the magic bytes decide for those.
        let plausible = essence.is_empty()
            || essence.starts_with("image/")
            || essence == "application/octet-stream"
            || essence == "binary/octet-stream";
        if !plausible {
            return Err(FetchError::NotImage { reason: format!("server says Content-Type {declared}") });
        }
        let declared_length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > self.max_bytes) {
            return Err(FetchError::TooLarge { limit: self.max_bytes });
        }
        let mut body = BytesMut::with_capacity(declared_length.unwrap_or(64 * 1024) as usize);
        while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&url, &e))? {
            if (body.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(FetchError::TooLarge { limit: self.max_bytes });
            }
            body.extend_from_slice(&chunk);
        }
        let content_type = sniff_image(&body).ok_or_else(|| FetchError::NotImage {
            reason: format!("the body is not JPEG, PNG, WebP, GIF, BMP or TIFF (Content-Type {declared:?})"),
        })?;
        Ok(Fetched { bytes: body.freeze(), content_type, final_url: url })
    }
}

/// Turns a client error into ours, recovering a refusal raised inside the DNS resolver.
fn transport_error(url: &Url, error: &reqwest::Error) -> FetchError {
    refusal_inside(error)
        .unwrap_or_else(|| FetchError::Transport { url: url.to_string(), reason: error_chain(error) })
}

/// The [`FetchError`] our resolver raised, somewhere in a client error's chain of sources.
pub(crate) fn refusal_inside(error: &(dyn std::error::Error + 'static)) -> Option<FetchError> {
    let mut source = Some(error);
    while let Some(current) = source {
        if let Some(ours) = current.downcast_ref::<FetchError>() {
            return Some(ours.clone());
        }
        source = current.source();
    }
    None
}

/// An error and its sources on one line: reqwest's own message alone rarely says what happened.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(current) = source {
        text.push_str(": ");
        text.push_str(&current.to_string());
        source = current.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(text: &str) -> Option<&'static str> {
        special_range(text.parse().unwrap())
    }

    #[test]
    fn special_ranges_are_recognised() {
        for (ip, range) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.31.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("203.0.113.9", "documentation"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
            ("2002:7f00:1::", "loopback"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fd12::1", "unique local (private)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("2001::1", "Teredo"),
        ] {
            assert_eq!(blocked(ip), Some(range), "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in
            ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:1.1.1.1", "2002:0808:0808::"]
        {
            assert_eq!(blocked(ip), None, "{ip}");
        }
    }

    #[test]
    fn allow_rules_parse() {
        assert_eq!("LocalHost.".parse(), Ok(AllowRule::Host("localhost".into())));
        assert_eq!("127.0.0.1".parse(), Ok(AllowRule::Network("127.0.0.1/32".parse().unwrap())));
        assert_eq!("[::1]".parse(), Ok(AllowRule::Network("::1/128".parse().unwrap())));
        assert_eq!("10.0.0.7/8".parse(), Ok(AllowRule::Network("10.0.0.0/8".parse().unwrap())));
        assert!("bad host!".parse::<AllowRule>().is_err());
    }

    #[test]
    fn mapped_address_matches_an_ipv4_allow_rule() {
        let policy = UrlPolicy::new(true, vec!["127.0.0.1".parse().unwrap()]);
        assert!(policy.parse("http://[::ffff:127.0.0.1]:8080/x.png").is_ok());
        assert!(policy.parse("http://127.0.0.2/x.png").is_err());
    }

    #[test]
    fn sniffs_magic_bytes() {
        assert_eq!(sniff_image(b"\xff\xd8\xff\xe0rest"), Some("image/jpeg"));
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
        assert_eq!(sniff_image(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff_image(b"GIF89a"), Some("image/gif"));
        assert_eq!(sniff_image(b"II*\0"), Some("image/tiff"));
        assert_eq!(sniff_image(b"<html>"), None);
    }
}
