//! `fhecam cockpit`: the page a city operator leaves open. It reads what the fleet already
//! publishes — each camera's retained availability and status, the agent's decrypted
//! results and its refusals — and serves every camera's state with live updates. It holds
//! no key and decrypts nothing.

pub mod board;
pub mod config;
pub mod link;
pub mod server;

pub use config::CockpitConfig;

use config::Settings as _;
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum CockpitError {
    #[error("http.listen {addr}: {source}; choose a free port or another address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving the page: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Config(#[from] config::CockpitConfigError),
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error("mqtt TLS: {0}")]
    Tls(#[from] fhecam_proto::mqtt::MqttSetupError),
    #[error("the cockpit's state was poisoned by a panic")]
    Poisoned,
}

/// Serves the page until `shutdown`; `ready` gets the address it listens on (useful with
/// port 0).
pub async fn run(
    cfg: CockpitConfig,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), CockpitError> {
    cfg.check()?;
    let addr = cfg
        .listen_addr()
        .map_err(|e| CockpitError::Config(config::CockpitConfigError::Invalid(e)))?;
    let (listener, local) = fhecam_metrics::bind(addr)
        .await
        .map_err(|source| CockpitError::Bind { addr, source })?;
    let board = board::Board::new(
        link::topics(&cfg),
        cfg.limits.max_cameras,
        cfg.limits.max_payload_bytes,
    );
    let shared = Arc::new(link::Shared::new(board));
    let app = server::router(shared.clone(), cfg.limits.max_streams, shutdown.clone());
    let link = {
        let (cfg, shared, shutdown) = (cfg.clone(), shared.clone(), shutdown.clone());
        tokio::spawn(async move { link::run(&cfg, shared, shutdown).await })
    };
    tracing::info!("cockpit on http://{local}/");
    if let Some(r) = ready {
        let _ = r.send(local);
    }
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(CockpitError::Serve);
    // the link ends with the page, whichever stops first
    shutdown.cancel();
    let linked = link.await.unwrap_or(Err(CockpitError::Poisoned));
    served.and(linked)
}
