//! `fhecam agent`: the backend decryption agent.

use anyhow::{Context, Result};
use fhecam::agent::{self, AgentConfig};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Backend configuration (TOML); FHECAM_* environment variables override it.
    #[arg(long, default_value = "/etc/fhecam/backend.toml")]
    config: PathBuf,
    /// Check the configuration, the databases and the passphrase, then exit without
    /// connecting.
    #[arg(long)]
    check: bool,
}

pub fn run(args: AgentArgs) -> Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        if args.check {
            let p = tokio::task::block_in_place(|| agent::Processor::new(cfg.clone()))?;
            drop(p);
            println!(
                "config {}: ok; databases open; subscription {}",
                args.config.display(),
                cfg.subscription()
            );
            return Ok(());
        }
        let shutdown = CancellationToken::new();
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping");
                    shutdown.cancel();
                }
            });
        }
        let stats = agent::run(cfg, shutdown, None).await?;
        println!("{}", serde_json::to_string(&stats)?);
        Ok(())
    })
}
