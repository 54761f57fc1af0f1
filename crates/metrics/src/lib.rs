//! Prometheus metrics for the camera daemon and the agent: the `[metrics]` section both
//! configurations share, the `/metrics` endpoint (the text format of `prometheus-client`),
//! and helpers for collectors that read counters the process keeps anyway, so the
//! numbers scraped are the numbers the stats topic and the closing stats report.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use prometheus_client;

/// `[metrics]`: where `/metrics` is served. Absent: no endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// ADDRESS:PORT of the endpoint (port 0: any free port, logged at start). Loopback
    /// unless `allow_remote`.
    pub listen: String,
    /// Needed for a `listen` address other than loopback: the endpoint has no
    /// authentication or TLS; scrape it through a proxy that has both, or keep it on a
    /// management network.
    #[serde(default)]
    pub allow_remote: bool,
}

impl MetricsConfig {
    /// `listen` as an address, bounded as `check` bounds it.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        let a: SocketAddr = self.listen.parse().map_err(|e| {
            format!(
                "metrics.listen {:?}: {e}; expected ADDRESS:PORT such as 127.0.0.1:9464",
                self.listen.chars().take(80).collect::<String>()
            )
        })?;
        if !a.ip().is_loopback() && !self.allow_remote {
            return Err(format!(
                "metrics.listen {a} is not a loopback address: the endpoint has no authentication or TLS; set metrics.allow_remote = true to serve it there"
            ));
        }
        Ok(a)
    }
}

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metrics.listen {addr}: {source}; choose a free port or another address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// A duration histogram in seconds.
#[derive(Clone, Debug)]
pub struct Seconds(pub Histogram);

impl Seconds {
    /// Buckets from `first` seconds, doubling, `count` of them.
    pub fn new(first: f64, count: u16) -> Self {
        Seconds(Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(first, 2.0, count),
        ))
    }

    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // writing to a String cannot fail
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` until `shutdown`; returns the bound address.
pub async fn serve(
    cfg: &MetricsConfig,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    use axum::http::header;
    let addr = cfg.addr().map_err(MetricsError::Config)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
            }
        }),
    );
    tracing::info!("metrics on http://{local}/metrics");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!("metrics endpoint: {e}");
        }
    });
    Ok((local, task))
}

/// What a collector writes on each scrape: values read from the process's own counters.
pub struct Emit<'a, 'b>(pub &'b mut DescriptorEncoder<'a>);

type Fmt = Result<(), std::fmt::Error>;

impl Emit<'_, '_> {
    /// A counter (`<name>_total`).
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> Fmt {
        let c = ConstCounter::new(v);
        c.encode(self.0.encode_descriptor(name, help, None, c.metric_type())?)
    }

    /// A counter split by one label.
    pub fn counters_by(&mut self, name: &str, help: &str, label: &str, vs: &[(&str, u64)]) -> Fmt {
        let kind = ConstCounter::new(0u64).metric_type();
        let mut m = self.0.encode_descriptor(name, help, None, kind)?;
        for (value, v) in vs {
            let labels = [(label, *value)];
            ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> Fmt {
        let g = ConstGauge::new(v);
        g.encode(self.0.encode_descriptor(name, help, None, g.metric_type())?)
    }

    /// An info metric (`<name>_info 1` with the labels).
    pub fn info(&mut self, name: &str, help: &str, labels: Vec<(String, String)>) -> Fmt {
        let i = prometheus_client::metrics::info::Info::new(labels);
        i.encode(self.0.encode_descriptor(name, help, None, i.metric_type())?)
    }
}

/// A collector from a closure over the process's counters.
pub struct FnCollector<F>(pub F);

impl<F> std::fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCollector")
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut Emit) -> Fmt + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Fmt {
        (self.0)(&mut Emit(&mut encoder))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_and_histograms_render_in_the_text_format() {
        let mut r = Registry::with_prefix("fhecam_test");
        let s = Seconds::new(0.5, 4);
        s.observe(std::time::Duration::from_secs(1));
        r.register("work_duration_seconds", "How long work takes", s.0.clone());
        r.register_collector(Box::new(FnCollector(|e: &mut Emit| {
            e.counter("things", "Things done", 3)?;
            e.counters_by("drops", "Things dropped", "reason", &[("busy", 1), ("bad", 2)])?;
            e.gauge("connected", "1 when connected", 1.0)?;
            e.info("model", "The model", vec![("name".into(), "d\"x".into())])
        })));
        let t = render(&r);
        for line in [
            "fhecam_test_things_total 3",
            "fhecam_test_drops_total{reason=\"busy\"} 1",
            "fhecam_test_connected 1",
            "fhecam_test_model_info{name=\"d\\\"x\"} 1",
            "fhecam_test_work_duration_seconds_count 1",
        ] {
            assert!(t.contains(line), "{line} in\n{t}");
        }
    }

    #[test]
    fn remote_listen_needs_a_choice() {
        let mut c = MetricsConfig {
            listen: "0.0.0.0:9464".into(),
            allow_remote: false,
        };
        assert!(c.addr().unwrap_err().contains("allow_remote"));
        c.allow_remote = true;
        c.addr().unwrap();
        c.listen = "x".into();
        assert!(c.addr().unwrap_err().contains("metrics.listen"));
    }
}
