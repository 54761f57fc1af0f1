//! `fhecam agent`: the backend decryption agent.

use anyhow::{Context, Result};
use fhecam::agent::{self, AgentConfig};
use fhecam_proto::settings::Settings as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Backend configuration (TOML); FHECAM_* environment variables override it.
    #[arg(long, default_value = "/etc/fhecam/backend.toml")]
    config: PathBuf,
    /// Check without connecting or writing anything: the configuration's values, the owner
    /// database (opened read-only), that the passphrase unseals every model's key, the
    /// passphrase file's mode (0600), the state database, the TLS files.
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
    if args.check {
        // reads only: the owner database read-only, the state database if present
        let p = agent::processor::preflight(&cfg)?;
        for u in &p.unusable {
            println!("warning: {u}; its inferences will be refused");
        }
        println!(
            "config {}: ok; owner database {} read-only: {} model version(s), every key unseals \
             with the passphrase ({} of them unusable, above); state {}; client id {}; subscription {}",
            args.config.display(),
            cfg.db.display(),
            p.models,
            p.unusable.len(),
            p.state,
            agent::processor::client_id_preview(&cfg)?,
            cfg.subscription()
        );
        return Ok(());
    }
    rt.block_on(async move {
        let shutdown = super::stop_on_signals();
        let stats = agent::run(cfg, shutdown, None).await?;
        println!("{}", serde_json::to_string(&stats)?);
        Ok(())
    })
}
