//! `fhecam cockpit`: the live fleet page.

use anyhow::{Context, Result};
use fhecam_cockpit::CockpitConfig;
use fhecam_proto::settings::Settings as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CockpitArgs {
    /// Cockpit configuration (TOML: `[mqtt]` as the agent's, `[http]`, `[limits]`);
    /// FHECAM_* environment variables override it. Without it: the broker on
    /// localhost:1883 and the page on http://127.0.0.1:9480/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration and exit, without connecting or listening.
    #[arg(long)]
    check: bool,
}

pub fn run(args: CockpitArgs) -> Result<()> {
    let cfg = match &args.config {
        Some(p) => CockpitConfig::load(p)?,
        None => CockpitConfig::default(),
    };
    if args.check {
        println!(
            "config {}: ok; broker {}:{}; page on http://{}/",
            args.config
                .as_ref()
                .map_or("(defaults)".into(), |p| p.display().to_string()),
            cfg.mqtt.conn.host,
            cfg.mqtt.conn.port,
            cfg.http.listen
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let shutdown = super::stop_on_signals();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let serving = tokio::spawn(fhecam_cockpit::run(cfg, shutdown, Some(tx)));
        if let Ok(addr) = rx.await {
            // scripts and tests read this line for the port (with http.listen port 0)
            println!("cockpit: http://{addr}/");
        }
        serving.await.context("the cockpit task failed")??;
        Ok(())
    })
}
