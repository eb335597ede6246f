//! What keeps pages on other sites from driving this service through a visitor's browser, and
//! slow clients from holding connections: the CORS policy, the Origin rule for state-changing
//! requests, the Host rule against DNS rebinding, the content types JSON routes read, and the body
//! read deadline.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, header};
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tokio::time::Sleep;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use super::errors::ApiError;

/// Who may call the API from a browser page, and by which names the server may be addressed.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    /// `--cors-allow-origin '*'`: any page may (today's open behaviour).
    any_origin: bool,
    /// Origins besides the server's own, as `scheme://host[:port]`, lower case.
    origins: Vec<String>,
    /// The `Host` values requests must name, lower case; `None` where any is accepted.
    hosts: Option<Vec<String>>,
    /// No API key is configured, so the Origin rule is all that stops a foreign page.
    open: bool,
}

impl BrowserPolicy {
    /// The policy of a server listening on `listen` with these flags. The Host rule applies on a
    /// loopback listener and wherever `public_hosts` are named; a `0.0.0.0` listener behind a load
    /// balancer without `--public-host` accepts any Host.
    pub fn new(
        listen: SocketAddr,
        allow_origins: &[String],
        public_hosts: &[String],
        open: bool,
    ) -> BrowserPolicy {
        let any_origin = allow_origins.iter().any(|o| o.trim() == "*");
        let origins = allow_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty() && o != "*")
            .collect();
        let mut hosts: Vec<String> = public_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        hosts.retain(|h| !h.is_empty());
        let hosts = if listen.ip().is_loopback() || !hosts.is_empty() {
            hosts.extend(own_hosts(listen));
            Some(hosts)
        } else {
            None
        };
        BrowserPolicy { any_origin, origins, hosts, open }
    }

    /// The CORS layer: the server's own origin and the allowed ones (or any, with `*`) may read
    /// responses; gRPC-Web's trailers-as-headers are exposed to them.
    pub fn cors(self: &Arc<Self>) -> CorsLayer {
        let policy = self.clone();
        let allow = if self.any_origin {
            AllowOrigin::any()
        } else {
            AllowOrigin::predicate(move |origin: &HeaderValue, parts: &Parts| {
                policy.allows_origin(origin, host(parts.headers.get(header::HOST), parts.uri.authority()))
            })
        };
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(AllowMethods::mirror_request())
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                "grpc-status".parse().expect("static"),
                "grpc-message".parse().expect("static"),
                "grpc-status-details-bin".parse().expect("static"),
            ])
            .max_age(Duration::from_secs(3600))
    }

    fn allows_origin(&self, origin: &HeaderValue, host: Option<&str>) -> bool {
        if self.any_origin {
            return true;
        }
        let Ok(origin) = origin.to_str() else { return false };
        let origin = origin.to_ascii_lowercase();
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        authority.is_some_and(|a| host.is_some_and(|h| a == h.to_ascii_lowercase()))
            || self.origins.contains(&origin)
    }

    fn allows_host(&self, host: Option<&str>) -> bool {
        match (&self.hosts, host) {
            (None, _) | (_, None) => true,
            (Some(allowed), Some(host)) => {
                let host = host.to_ascii_lowercase();
                allowed.iter().any(|a| *a == host || (!a.contains(':') && host_name(&host) == a))
            }
        }
    }

    /// Why this request may not go on, if it may not.
    pub fn refusal(&self, request: &Request) -> Option<ApiError> {
        let host = host(request.headers().get(header::HOST), request.uri().authority());
        if !self.allows_host(host) {
            return Some(ApiError::Forbidden(format!(
                "This server does not answer to the host {:?}; name it with --public-host.",
                host.unwrap_or_default()
            )));
        }
        let changes_state = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        let origin = request.headers().get(header::ORIGIN)?;
        if self.open && changes_state && !self.allows_origin(origin, host) {
            return Some(ApiError::Forbidden(format!(
                "Pages from {} may not change anything here while no API key is configured; allow \
                 the origin with --cors-allow-origin, or configure an API key.",
                origin.to_str().unwrap_or("another origin")
            )));
        }
        None
    }
}

/// The names a listener on `listen` is reached by from this machine: its address and, on
/// loopback, `localhost`; each with the port.
fn own_hosts(listen: SocketAddr) -> Vec<String> {
    let port = listen.port();
    let mut hosts = vec![listen.to_string()];
    if listen.ip().is_loopback() {
        hosts.push(format!("localhost:{port}"));
        let other = match listen.ip() {
            IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)),
            IpAddr::V6(_) => SocketAddr::from(([127, 0, 0, 1], port)),
        };
        hosts.push(other.to_string());
    }
    if port == 80 {
        let bare: Vec<String> = hosts.iter().map(|h| h.trim_end_matches(":80").to_string()).collect();
        hosts.extend(bare);
    }
    hosts
}

/// The host a request names: `Host` (HTTP/1.1) or the URI's authority (HTTP/2).
fn host<'a>(
    header: Option<&'a HeaderValue>,
    authority: Option<&'a axum::http::uri::Authority>,
) -> Option<&'a str> {
    header.and_then(|h| h.to_str().ok()).or(authority.map(|a| a.as_str()))
}

/// `example.com` of `example.com:8080`; IPv6 literals keep their brackets.
fn host_name(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// Answers 415 to a body a JSON route cannot read: anything but JSON, or multipart where the
/// route takes a photo with the request. A body-less request passes, whatever its headers.
pub fn check_json_body(request: &Request, multipart_too: bool) -> Result<(), ApiError> {
    let empty = request.body().size_hint().exact() == Some(0);
    if empty {
        return Ok(());
    }
    // A body without a type is read as JSON: browsers label every body they send, so it cannot come
    // from a page's form or CORS-simple fetch.
    let Some(content_type) = request.headers().get(header::CONTENT_TYPE) else { return Ok(()) };
    let essence =
        content_type.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json" || essence.ends_with("+json");
    if json || (multipart_too && essence == "multipart/form-data") {
        return Ok(());
    }
    let accepted = if multipart_too { "application/json or multipart/form-data" } else { "application/json" };
    Err(ApiError::UnsupportedMediaType(format!("This route reads {accepted}, not {essence:?}.")))
}

/// The deadline a request body was given by [`with_body_deadline`].
pub struct BodyDeadline {
    /// How long the body had.
    pub timeout: Duration,
    expired: Arc<AtomicBool>,
}

impl BodyDeadline {
    /// Whether the body was still arriving when its time was up. The request is answered with 408
    /// and the connection closed, whatever the handler made of the failed read.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }
}

/// Gives `request`'s body `timeout` from now to arrive in full; a body still arriving then ends
/// with an error. A body-less request needs no deadline.
pub fn with_body_deadline(request: Request, timeout: Duration) -> (Request, Option<BodyDeadline>) {
    if request.body().size_hint().exact() == Some(0) {
        return (request, None);
    }
    let expired = Arc::new(AtomicBool::new(false));
    let flag = expired.clone();
    let until = tokio::time::Instant::now() + timeout;
    let request =
        request.map(|body| Body::new(DeadlineBody { inner: body, until, deadline: None, expired: flag }));
    (request, Some(BodyDeadline { timeout, expired }))
}

/// A request body that fails once its deadline passes before its end.
struct DeadlineBody {
    inner: Body,
    /// When the whole body must have arrived.
    until: tokio::time::Instant,
    /// The timer, armed the first time the body is not all there: most bodies come with their
    /// request's head and never need one.
    deadline: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let until = this.until;
        let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new("the request body did not arrive in time"))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, host: &str, origin: Option<&str>) -> Request {
        let mut builder = Request::builder().method(method).uri("/v1/generate").header(header::HOST, host);
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(Body::empty()).unwrap()
    }

    fn loopback(allow: &[&str], open: bool) -> BrowserPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        BrowserPolicy::new("127.0.0.1:8080".parse().unwrap(), &allow, &[], open)
    }

    #[test]
    fn a_loopback_server_answers_to_its_own_names_only() {
        let policy = loopback(&[], true);
        for host in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"] {
            assert!(policy.refusal(&request(Method::GET, host, None)).is_none(), "{host}");
        }
        for host in ["attacker.example:8080", "localhost:9999", "127.0.0.1"] {
            assert!(
                matches!(policy.refusal(&request(Method::GET, host, None)), Some(ApiError::Forbidden(_))),
                "{host}"
            );
        }
    }

    #[test]
    fn an_unspecified_listener_answers_to_any_host_until_public_hosts_are_named() {
        let any = BrowserPolicy::new("0.0.0.0:8080".parse().unwrap(), &[], &[], true);
        assert!(any.refusal(&request(Method::GET, "deskgen.internal", None)).is_none());
        let named =
            BrowserPolicy::new("0.0.0.0:8080".parse().unwrap(), &[], &["desk.example.com".into()], true);
        assert!(named.refusal(&request(Method::GET, "desk.example.com:443", None)).is_none());
        assert!(named.refusal(&request(Method::GET, "rebound.example", None)).is_some());
    }

    #[test]
    fn foreign_pages_may_not_change_state_on_an_open_server() {
        let policy = loopback(&[], true);
        let foreign = Some("http://attacker.example");
        assert!(policy.refusal(&request(Method::POST, "127.0.0.1:8080", foreign)).is_some());
        assert!(policy.refusal(&request(Method::POST, "127.0.0.1:8080", Some("null"))).is_some());
        assert!(policy.refusal(&request(Method::GET, "127.0.0.1:8080", foreign)).is_none());
        let own = Some("http://127.0.0.1:8080");
        assert!(policy.refusal(&request(Method::POST, "127.0.0.1:8080", own)).is_none());
        assert!(policy.refusal(&request(Method::POST, "127.0.0.1:8080", None)).is_none());
        let keyed = loopback(&[], false);
        assert!(keyed.refusal(&request(Method::POST, "127.0.0.1:8080", foreign)).is_none());
        let allowed = loopback(&["http://Attacker.example/"], true);
        assert!(allowed.refusal(&request(Method::POST, "127.0.0.1:8080", foreign)).is_none());
        let any = loopback(&["*"], true);
        assert!(any.refusal(&request(Method::POST, "127.0.0.1:8080", foreign)).is_none());
    }

    #[test]
    fn json_routes_refuse_other_bodies_and_pass_empty_ones() {
        let with = |content_type: Option<&str>, body: &'static str| {
            let mut builder = Request::builder().method(Method::POST).uri("/v1/generate");
            if let Some(content_type) = content_type {
                builder = builder.header(header::CONTENT_TYPE, content_type);
            }
            builder.body(Body::from(body)).unwrap()
        };
        assert!(check_json_body(&with(Some("application/json; charset=utf-8"), "{}"), false).is_ok());
        assert!(check_json_body(&with(Some("multipart/form-data; boundary=x"), "--x--"), true).is_ok());
        assert!(check_json_body(&with(Some("multipart/form-data; boundary=x"), "--x--"), false).is_err());
        assert!(check_json_body(&with(Some("text/plain"), "{}"), true).is_err());
        assert!(check_json_body(&with(Some("application/x-www-form-urlencoded"), "{}"), true).is_err());
        assert!(check_json_body(&with(None, "{}"), true).is_ok());
        assert!(check_json_body(&with(Some("text/plain"), ""), true).is_ok());
    }
}
