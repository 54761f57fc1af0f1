//! Prometheus metrics for the camera daemon and the agent: the `[metrics]` section both
//! configurations share, the `/metrics` endpoint in the Prometheus text format (rendered
//! by `metrics-exporter-prometheus`, each process with its own recorder), and a collector
//! that reads the counters the process keeps anyway on every scrape, so the numbers
//! scraped are the numbers the stats topic and the closing stats report.

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

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
    /// `listen` as an address, or why not (naming the field).
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

/// Histogram buckets (seconds): 10 ms doubling to about 22 minutes, for decryptions (ms)
/// and encrypted inferences (seconds to minutes).
fn buckets() -> Vec<f64> {
    (0..18).map(|i| 0.01 * f64::from(1u32 << i)).collect()
}

/// A duration histogram, recording only once an [`Exporter`] is attached (a process
/// without `[metrics]` records nothing).
#[derive(Debug, Default)]
pub struct Seconds(OnceLock<metrics::Histogram>);

impl Seconds {
    pub fn observe(&self, d: std::time::Duration) {
        if let Some(h) = self.0.get() {
            h.record(d.as_secs_f64());
        }
    }
}

type Collect = Box<dyn Fn(&mut Emit) + Send + Sync>;

/// One process's metrics: its own recorder, its collector, its histograms.
pub struct Exporter {
    prefix: &'static str,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    collect: Collect,
}

impl Exporter {
    /// Metrics named `<prefix>_...`; `collect` writes the counters on each scrape.
    pub fn new(prefix: &'static str, collect: impl Fn(&mut Emit) + Send + Sync + 'static) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets())
            .expect("fixed, non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        Exporter {
            prefix,
            recorder,
            handle,
            collect: Box::new(collect),
        }
    }

    /// Attaches `s` as the histogram `<prefix>_<name>` (`name` ends in `_seconds`).
    pub fn histogram(&self, s: &Seconds, name: &str, help: &'static str) {
        let full = format!("{}_{name}", self.prefix);
        metrics::with_local_recorder(&self.recorder, || {
            metrics::describe_histogram!(full.clone(), metrics::Unit::Seconds, help);
            let _ = s.0.set(metrics::histogram!(full));
        });
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            (self.collect)(&mut Emit {
                prefix: self.prefix,
            })
        });
        self.handle.render()
    }
}

/// The listener of an HTTP endpoint of fhecam's (metrics, cockpit) and the address it got
/// (the port chosen where `addr` asks for port 0).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `GET /metrics` until `shutdown`; returns the bound address.
pub async fn serve(
    cfg: &MetricsConfig,
    exporter: Arc<Exporter>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    use axum::http::header;
    let addr = cfg.addr().map_err(MetricsError::Config)?;
    let (listener, local) = bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let exporter = exporter.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    exporter.render(),
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

/// What a collector writes on each scrape (inside the exporter's own recorder).
pub struct Emit {
    prefix: &'static str,
}

impl Emit {
    fn name(&self, name: &str, suffix: &str) -> String {
        format!("{}_{name}{suffix}", self.prefix)
    }

    /// A counter `<prefix>_<name>_total`.
    pub fn counter(&mut self, name: &str, help: &'static str, v: u64) {
        let n = self.name(name, "_total");
        metrics::describe_counter!(n.clone(), help);
        metrics::counter!(n).absolute(v);
    }

    /// A counter split by one label.
    pub fn counters_by(
        &mut self,
        name: &str,
        help: &'static str,
        label: &'static str,
        vs: &[(&str, u64)],
    ) {
        let n = self.name(name, "_total");
        metrics::describe_counter!(n.clone(), help);
        for (value, v) in vs {
            metrics::counter!(n.clone(), label => value.to_string()).absolute(*v);
        }
    }

    /// [`Emit::counters_by`] over a shared tally: each of `always` (0 where the tally has
    /// none yet, so the series exists from the first scrape), then the tally's other keys.
    pub fn counters_in<K: AsRef<str> + Ord>(
        &mut self,
        name: &str,
        help: &'static str,
        label: &'static str,
        tally: &std::sync::Mutex<std::collections::BTreeMap<K, u64>>,
        always: &[&str],
    ) {
        let Ok(tally) = tally.lock() else { return };
        let count = |k: &str| {
            tally
                .iter()
                .find(|(t, _)| t.as_ref() == k)
                .map_or(0, |(_, v)| *v)
        };
        let mut vs: Vec<(&str, u64)> = always.iter().map(|&k| (k, count(k))).collect();
        vs.extend(
            tally
                .iter()
                .map(|(k, v)| (k.as_ref(), *v))
                .filter(|(k, _)| !always.contains(k)),
        );
        self.counters_by(name, help, label, &vs);
    }

    /// `<prefix>_mqtt_connected`: 1 while the process is connected to its broker.
    pub fn mqtt_connected(&mut self, up: bool) {
        let v = f64::from(u8::from(up));
        self.gauge("mqtt_connected", "1 while connected to the broker", v);
    }

    pub fn gauge(&mut self, name: &str, help: &'static str, v: f64) {
        let n = self.name(name, "");
        metrics::describe_gauge!(n.clone(), help);
        metrics::gauge!(n).set(v);
    }

    /// An info metric: the gauge `<prefix>_<name>_info` at 1 with the labels (the text
    /// format has no info type).
    pub fn info(&mut self, name: &str, help: &'static str, labels: Vec<(&'static str, String)>) {
        let n = self.name(name, "_info");
        metrics::describe_gauge!(n.clone(), help);
        let labels: Vec<metrics::Label> = labels
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect();
        metrics::gauge!(n, labels).set(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_and_histograms_render_in_the_text_format() {
        let e = Exporter::new("fhecam_test", |e: &mut Emit| {
            e.counter("things", "Things done", 3);
            e.counters_by(
                "drops",
                "Things dropped",
                "reason",
                &[("busy", 1), ("bad", 2)],
            );
            e.gauge("connected", "1 when connected", 1.0);
            e.info("model", "The model", vec![("name", "d\"x".into())]);
        });
        let s = Seconds::default();
        s.observe(std::time::Duration::from_secs(1)); // not attached: nothing
        e.histogram(&s, "work_duration_seconds", "How long work takes");
        s.observe(std::time::Duration::from_secs(1));
        let t = e.render();
        for line in [
            "# HELP fhecam_test_things_total Things done",
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
