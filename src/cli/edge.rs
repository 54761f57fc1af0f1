//! `fhecam run` (the edge daemon under systemd) and `fhecam validate`.

use anyhow::{Context, Result};
use fhecam::edge::{self, EdgeConfig, Milestone};
use fhecam_proto::settings::Settings as _;
use sd_notify::NotifyState;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand)]
pub enum EdgeCmd {
    /// Run the edge daemon: frames from the configured GStreamer pipeline are preprocessed,
    /// encrypted and run through the bundle's encrypted CNN; results go to the MQTT broker
    /// through an on-disk outbox. SIGTERM/SIGINT drain in-flight work and exit.
    Run {
        /// Edge configuration (TOML); FHECAM_* environment variables override it
        /// (e.g. FHECAM_MQTT__HOST=broker).
        #[arg(long, default_value = "/etc/fhecam/edge.toml")]
        config: PathBuf,
    },
    /// Check an edge configuration without starting or writing anything: fields and values,
    /// the owner key and the bundle's signature and contents, the GStreamer pipeline's
    /// syntax, and that the outbox directory is writable (or, if missing, that its nearest
    /// existing parent is, where `run` will create it).
    Validate {
        #[arg(long, default_value = "/etc/fhecam/edge.toml")]
        config: PathBuf,
    },
}

pub fn run(cmd: EdgeCmd) -> Result<()> {
    match cmd {
        EdgeCmd::Run { config } => run_daemon(&config),
        EdgeCmd::Validate { config } => validate(&config),
    }
}

fn validate(path: &Path) -> Result<()> {
    let cfg = EdgeConfig::load(path)?;
    println!("config {}: fields ok", path.display());
    let b = match edge::daemon::load_bundle(&cfg) {
        Ok(b) => b,
        // `run` starts on the bundle deployed since when the configured one is unusable
        Err(e) => match cfg
            .deploy
            .as_ref()
            .map(|d| d.state_dir.join(edge::deploy::CURRENT_FILE))
        {
            Some(saved) if saved.exists() => {
                println!(
                    "bundle {}: {e}; `run` starts on {}",
                    cfg.bundle.display(),
                    saved.display()
                );
                let owner = fhecam::bundle::read_owner_key(&cfg.owner_key)?;
                fhecam::bundle::load_file(&saved, &owner)
                    .with_context(|| format!("{} refused", saved.display()))?
            }
            _ => return Err(e.into()),
        },
    };
    let h = &b.header;
    println!(
        "bundle {}: signature ok, {} version {} ({}), input {}x{}x{}",
        cfg.bundle.display(),
        h.name,
        h.version,
        h.model_id,
        h.input.channels,
        h.input.height,
        h.input.width
    );
    if cfg.infer.input_mode == fhecam::fhe::eval::InputMode::DeviceClear {
        fhecam::fhe::eval::check_device_clear(&b.model.arch)?;
    }
    println!("input: {}", cfg.infer.input_mode.name());
    edge::source::check_pipeline(&cfg.source.pipeline)?;
    println!("pipeline: parses, has an appsink");
    println!(
        "outbox {}: {}",
        cfg.outbox.dir.display(),
        check_outbox_dir(&cfg.outbox.dir)?
    );
    println!(
        "broker {}:{} (not contacted by validate), topics {}/*",
        cfg.mqtt.conn.host,
        cfg.mqtt.conn.port,
        cfg.topic_base()
    );
    match &cfg.deploy {
        None => println!("deploy: off (runs the bundle file; SIGHUP re-reads it)"),
        Some(d) => {
            println!(
                "deploy state {}: {}",
                d.state_dir.display(),
                check_outbox_dir(&d.state_dir)?
            );
            let s = edge::deploy::describe_state(&d.state_dir)?;
            println!("deploy state: {s}");
            if let Some(p) = &d.drop_dir {
                println!("drop directory {}: {}", p.display(), check_outbox_dir(p)?);
            }
            if d.push {
                println!("pushed bundles: {}", cfg.deploy_topics().join(", "));
            }
        }
    }
    Ok(())
}

/// Checks, without creating or writing anything, that `run` can use `dir` (the outbox,
/// the deploy state or drop directory).
fn check_outbox_dir(dir: &Path) -> Result<String> {
    match std::fs::metadata(dir) {
        Ok(_) => {
            writable_dir(dir).with_context(|| format!("outbox {}", dir.display()))?;
            Ok("exists, writable directory".into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir
                .ancestors()
                .skip(1)
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    }
                })
                .find(|p| p.exists())
                .context("no existing parent")?;
            writable_dir(parent).with_context(|| {
                format!(
                    "outbox {} does not exist and cannot be created",
                    dir.display()
                )
            })?;
            Ok(format!(
                "does not exist; `run` will create it in {} (writable directory)",
                parent.display()
            ))
        }
        Err(e) => Err(e).with_context(|| format!("outbox {}", dir.display())),
    }
}

/// A directory this process may create files in, by access(2) (the daemon's own user and
/// mounts), on a filesystem that stores files.
fn writable_dir(p: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(p)?;
    anyhow::ensure!(m.is_dir(), "{} is not a directory", p.display());
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: `c` is a NUL-terminated path; `st` is only read after statfs filled it.
    #[allow(clippy::useless_conversion)] // f_type is i64 here, u32 or i32 on other targets
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then(|| i64::from(st.f_type))
    };
    // SAFETY: as above.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("{} is not a writable directory: {e}", p.display());
    }
    // root passes access(2) everywhere: refuse kernel interfaces and write-protected dirs
    let kernel = [
        libc::PROC_SUPER_MAGIC,
        libc::SYSFS_MAGIC,
        libc::CGROUP_SUPER_MAGIC,
        libc::CGROUP2_SUPER_MAGIC,
        libc::DEBUGFS_MAGIC,
    ]
    .map(i64::from);
    anyhow::ensure!(
        !fs_type.is_some_and(|t| kernel.contains(&t)),
        "{} is a kernel interface (proc, sysfs, cgroup), not a writable directory",
        p.display()
    );
    anyhow::ensure!(
        m.permissions().mode() & 0o222 != 0,
        "{} is not a writable directory (mode {:o})",
        p.display(),
        m.permissions().mode() & 0o7777
    );
    Ok(())
}

const LOADED: u8 = 1;
const PLAYING: u8 = 2;
const CONNECTED: u8 = 4;
/// Added to the drain deadline in EXTEND_TIMEOUT_USEC: the publish linger (≤ 10 s) and
/// disconnecting.
const DRAIN_NOTIFY_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);

fn run_daemon(path: &Path) -> Result<()> {
    let cfg = EdgeConfig::load(path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        // FHE has its own pool; tokio only moves bytes
        .worker_threads(2)
        .thread_name("tokio")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        watch_stop_signals(&cancel);
        let reload = watch_reload();
        let health = Arc::new(edge::health::Health::default());
        feed_watchdog(&health);
        let report = edge::run(cfg, cancel, reload, systemd_milestones(), health).await?;
        tracing::info!("stopped ({:?}): {:?}", report.end, report.stats);
        println!("{}", serde_json::to_string(&report.stats)?);
        Ok(())
    })
}

/// The daemon's milestones told to systemd: READY=1 once the bundle is loaded, the
/// pipeline plays and the broker is connected; the drain deadline as EXTEND_TIMEOUT_USEC.
fn systemd_milestones() -> Arc<dyn Fn(Milestone) + Send + Sync> {
    let state = AtomicU8::new(0);
    Arc::new(move |m: Milestone| {
        let bit = match m {
            Milestone::BundleLoaded => LOADED,
            Milestone::PipelinePlaying => PLAYING,
            Milestone::BrokerConnected => CONNECTED,
            Milestone::BrokerDisconnected => {
                state.fetch_and(!CONNECTED, Ordering::SeqCst);
                return;
            }
            Milestone::Draining(left) => {
                // past TimeoutStopSec systemd would SIGKILL the frame being drained;
                // the margin covers publishing the outbox and `offline`
                let usec = (left + DRAIN_NOTIFY_MARGIN).as_micros();
                let usec = u32::try_from(usec).unwrap_or(u32::MAX);
                let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
                return;
            }
        };
        let before = state.fetch_or(bit, Ordering::SeqCst);
        let all = LOADED | PLAYING | CONNECTED;
        if before & all != all && (before | bit) & all == all {
            tracing::info!("ready: bundle loaded, pipeline playing, broker connected");
            let _ = sd_notify::notify(&[NotifyState::Ready]);
        }
    })
}

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C): the one cancellation path.
fn watch_stop_signals(cancel: &CancellationToken) {
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
        cancel.cancel();
    });
}

/// SIGHUP (systemctl reload): offer the configured bundle file again.
fn watch_reload() -> Arc<tokio::sync::Notify> {
    let reload = Arc::new(tokio::sync::Notify::new());
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            let reload = reload.clone();
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    reload.notify_one();
                }
            });
        }
        Err(e) => tracing::error!("cannot watch SIGHUP: {e}"),
    }
    reload
}

/// The watchdog is fed from here, so a wedged runtime stops feeding it, and only while
/// every stage of the daemon is alive and beating.
fn feed_watchdog(health: &Arc<edge::health::Health>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let health = health.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        let mut fed = true;
        loop {
            tick.tick().await;
            match health.check(period) {
                Ok(()) => {
                    if !fed {
                        tracing::info!("watchdog: every stage alive again; fed again");
                    }
                    fed = true;
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
                Err(why) if fed => {
                    fed = false;
                    tracing::error!(
                        "watchdog: {why}; no longer fed (systemd restarts the service)"
                    );
                }
                Err(_) => {}
            }
        }
    });
}
