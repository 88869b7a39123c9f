//! Logs and traces of a gateway or worker process.
//!
//! Logs: JSON lines when stdout is not a terminal (production), plain text otherwise, filtered
//! by `PARLEY_LOG` (`RUST_LOG` syntax).
//!
//! Traces: with an OTLP endpoint configured ([`TraceExport`]), the spans of [`trace`] are
//! exported over OTLP/HTTP (protobuf) in batches from a background thread, so a slow or absent
//! collector never holds up a request (spans beyond the batch queue are dropped). They pass
//! their own filter, independent of the log filter: message spans are `DEBUG` on the
//! [`trace::TARGET`] target, so logs at the default `info` never pay for them, and when no
//! endpoint is set they are disabled at their call sites and cost nothing. Warnings and errors
//! logged inside a traced span are recorded on it as span events. Sampling follows the standard
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` variables (default: parent-based, always on),
//! and `OTEL_SERVICE_NAME`/`OTEL_RESOURCE_ATTRIBUTES` name the process when set.

pub mod trace;

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracerProvider, SpanExporter},
};
use tracing::Level;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, fmt, prelude::*};

/// Where spans go.
pub enum TraceExport {
    /// Nowhere: no OpenTelemetry layer is installed.
    Off,
    /// To an OTLP/HTTP receiver at this base URL (`http://collector:4318`); spans are posted to
    /// `<base>/v1/traces`. An empty string defers to the standard `OTEL_EXPORTER_OTLP_*`
    /// variables.
    Otlp(String),
}

impl TraceExport {
    /// `PARLEY_OTLP_ENDPOINT` when set, else the standard `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (read by the exporter itself), else off.
    pub fn from_config(endpoint: Option<&str>) -> Self {
        match endpoint.filter(|e| !e.is_empty()) {
            Some(base) => Self::Otlp(base.to_owned()),
            None if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() =>
            {
                Self::Otlp(String::new())
            }
            None => Self::Off,
        }
    }
}

/// Failures to set up trace export.
#[derive(Debug, thiserror::Error)]
#[error("trace export: {0}")]
pub struct TelemetryError(#[from] opentelemetry_otlp::ExporterBuildError);

/// Keeps trace export running; dropping it flushes the spans still queued (bounded by the
/// exporter's timeout) and stops the export thread.
#[must_use = "dropping the guard stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // An error here only means spans could not be delivered at exit.
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process's logging and, if configured, trace export. `service` names the
/// process in traces (`parley-gateway`, `parley-worker`) unless `OTEL_SERVICE_NAME` says
/// otherwise. A second call (tests starting several apps in one process) changes nothing.
pub fn init(
    filter: &str,
    export: TraceExport,
    service: &'static str,
) -> Result<Telemetry, TelemetryError> {
    let provider = match export {
        TraceExport::Off => None,
        TraceExport::Otlp(base) => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
            if !base.is_empty() {
                builder =
                    builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(builder.build()?)
                .with_resource(resource(service))
                .build();
            Some(provider)
        }
    };
    install(filter, provider.as_ref());
    Ok(Telemetry { provider })
}

/// Like [`init`], exporting every span to `exporter` as it ends (no batching): for tests that
/// inspect the spans, such as with an in-memory exporter.
pub fn init_with_exporter(filter: &str, exporter: impl SpanExporter + 'static) -> Telemetry {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(resource("parley-test"))
        .build();
    install(filter, Some(&provider));
    Telemetry {
        provider: Some(provider),
    }
}

fn resource(service: &'static str) -> Resource {
    let builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(service).build()
    }
}

/// The global subscriber: the log layer under the log filter, and the OpenTelemetry layer (if
/// any) under its own. Without trace export the log filter is global, so disabled spans and
/// events are refused at their call sites before any layer sees them.
fn install(filter: &str, provider: Option<&SdkTracerProvider>) {
    let log_filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry();
    // An Err only means a subscriber is already installed.
    let _ = match provider {
        None => registry.with(log_filter).with(log_layer()).try_init(),
        Some(p) => {
            let spans = Targets::new()
                .with_target(trace::TARGET, Level::DEBUG)
                .with_default(Level::WARN);
            let otel = tracing_opentelemetry::layer()
                .with_tracer(p.tracer("parley"))
                .with_filter(spans);
            registry
                .with(log_layer().with_filter(log_filter))
                .with(otel)
                .try_init()
        }
    };
}

/// JSON lines, or plain text on a terminal.
fn log_layer<S>() -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if std::io::stdout().is_terminal() {
        fmt::layer().boxed()
    } else {
        fmt::layer().json().flatten_event(true).boxed()
    }
}

/// An error with its causes, `outer: inner: innermost`, for log lines.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            // Many errors repeat their cause's message in their own; say it once.
            let message = e.to_string();
            if !last.ends_with(&message) {
                write!(f, ": {message}")?;
            }
            last = message;
            cause = e.source();
        }
        Ok(())
    }
}
