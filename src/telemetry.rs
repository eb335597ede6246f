//! Logs, and traces when asked for: with `--otlp-endpoint`, spans go to an OpenTelemetry collector
//! over OTLP/gRPC, one trace per task across the API node that took it and the worker that ran it.
//!
//! The trace's context travels as a W3C `traceparent`: in from clients (HTTP header or gRPC
//! metadata), in the task's request (memory and Redis alike) to the worker, and out on webhooks.
//! Spans: the API request, `queue_wait` (from acknowledgement to claim), `task`, one per pipeline
//! stage (named as in `timings_ms`), and each webhook delivery. Without an endpoint no span is
//! exported and none of this runs: [`enabled`] is one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static ON: AtomicBool = AtomicBool::new(false);

/// The instrumentation scope spans are made in.
const SCOPE: &str = "deskgen";

/// Whether spans are exported.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Flushes the spans still buffered when dropped, at the end of `main`.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("cannot flush the last spans: {e}");
        }
    }
}

/// Where spans go, and whose they are.
pub struct Exporting<'a> {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: &'a str,
    /// The node's role, `api` or `worker` (the resource attribute `deskgen.node.role`).
    pub role: &'static str,
    /// The node's name (`service.instance.id`).
    pub node: String,
}

/// Installs the log subscriber (stderr, `RUST_LOG`), and with `exporting` the OTLP exporter and
/// the W3C trace-context propagator.
pub fn init(exporting: Option<Exporting<'_>>) -> anyhow::Result<Telemetry> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    let Some(exporting) = exporting else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(exporting.endpoint)
        .build()
        .with_context(|| format!("--otlp-endpoint {}", exporting.endpoint))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("deskgen")
        .with_attribute(KeyValue::new("service.instance.id", exporting.node))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attribute(KeyValue::new("deskgen.node.role", exporting.role))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    // deskgen's own spans, whatever RUST_LOG says of the logs.
    let spans = tracing_subscriber::filter::Targets::new().with_target(SCOPE, tracing::Level::INFO);
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(SCOPE)).with_filter(spans);
    tracing_subscriber::registry().with(logs).with(layer).init();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ON.store(true, Ordering::Relaxed);
    Ok(Telemetry { provider: Some(provider) })
}

/// The context a W3C `traceparent` names; the empty context for none or a malformed one.
pub fn context_of(traceparent: Option<&str>) -> Context {
    let Some(traceparent) = traceparent else { return Context::new() };
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The `traceparent` of the current span, when spans are exported.
pub fn current_traceparent() -> Option<String> {
    enabled().then(|| traceparent_of(&tracing::Span::current().context())).flatten()
}

/// The `traceparent` of `context`'s span, if it has a valid one.
pub fn traceparent_of(context: &Context) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the trace `traceparent` names (a client's, or a task's).
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if enabled() && traceparent.is_some() {
        let _ = span.set_parent(context_of(traceparent));
    }
}

/// Records a span that already happened, from `start` for `took`, as a child of the current span:
/// a pipeline stage once its time is known, or the time a task waited in the queue.
pub fn past_span(name: &str, start: SystemTime, took: Duration) {
    if !enabled() {
        return;
    }
    let parent = tracing::Span::current().context();
    let tracer = opentelemetry::global::tracer(SCOPE);
    let mut span =
        tracer.span_builder(name.to_string()).with_start_time(start).start_with_context(&tracer, &parent);
    span.end_with_timestamp(start + took);
}

/// Spans for stages that ran one after the other and were timed only by their durations (the
/// diffusion engine's), laid back to back so that the last ends at `end`.
pub fn back_to_back(stages: &[(&str, Duration)], end: SystemTime) {
    if !enabled() {
        return;
    }
    let mut start = end - stages.iter().map(|(_, took)| *took).sum::<Duration>();
    for (name, took) in stages {
        past_span(name, start, *took);
        start += *took;
    }
}

/// A span for one webhook delivery, child of the task's trace, and the `traceparent` it sends.
pub fn webhook_span(task: &Context, webhook_id: &str) -> (opentelemetry::global::BoxedSpan, Option<String>) {
    let tracer = opentelemetry::global::tracer(SCOPE);
    let span = tracer
        .span_builder("webhook")
        .with_attributes([KeyValue::new("webhook.id", webhook_id.to_string())])
        .start_with_context(&tracer, task);
    let traceparent = traceparent_of(&task.with_remote_span_context(span.span_context().clone()));
    (span, traceparent)
}
