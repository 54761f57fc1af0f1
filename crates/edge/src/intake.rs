//! Bundle offers while the daemon runs: MQTT pushes (handed over by the publisher), files
//! dropped into `deploy.drop_dir`, and SIGHUP (the configured bundle file again, and a scan
//! of the drop directory at once). Each offer is judged and loaded on a blocking thread
//! ([`Deployer::offer`]); an accepted one replaces [`Current`] for the next frame.

use super::config::{secs, EdgeConfig};
use super::deploy::{Current, Deployer, Outcome};
use super::stats::Stats;
use fhecam_proto::bundle::{self, MAX_BUNDLE_BYTES};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Where an offer came from (for the log and the refused-file rename).
#[derive(Clone, Debug)]
pub enum Origin {
    Push(String),
    Drop(PathBuf),
    Reload(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Push(t) => write!(f, "bundle pushed on {t}"),
            Origin::Drop(p) => write!(f, "bundle dropped as {}", p.display()),
            Origin::Reload(p) => write!(f, "bundle {} (reload)", p.display()),
        }
    }
}

pub struct Offer {
    pub origin: Origin,
    pub bytes: Vec<u8>,
}

/// Pushed offers waiting to be judged (each up to a bundle's size); more are refused with a
/// warning, and the owner pushes again.
pub const OFFER_QUEUE: usize = 2;

/// What the intake shares with the rest of the daemon.
pub struct Links {
    pub current: Arc<Current>,
    /// Fired after a swap, so the new model is reported at once.
    pub changed: Arc<Notify>,
    pub stats: Arc<Stats>,
}

/// Runs until `stop` fires.
pub async fn run(
    deployer: Deployer,
    cfg: Arc<EdgeConfig>,
    links: Links,
    mut offers: mpsc::Receiver<Offer>,
    reload: Arc<Notify>,
    stop: CancellationToken,
) {
    let deployer = Arc::new(Mutex::new(deployer));
    let drop_dir = cfg.deploy.as_ref().and_then(|d| d.drop_dir.clone());
    if let Some(d) = &drop_dir {
        if let Err(e) = super::deploy::create_private_dir(d) {
            tracing::error!(
                "deploy.drop_dir {}: {e}; dropped bundles are not taken",
                d.display()
            );
        }
    }
    let period = cfg
        .deploy
        .as_ref()
        .map(|d| secs(d.scan_interval_s))
        .unwrap_or(std::time::Duration::from_secs(3600));
    let mut tick = tokio::time::interval(period);
    let mut seen = HashMap::new();
    let mut pushing = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            o = offers.recv(), if pushing => match o {
                Some(o) => { judge(&deployer, &links, o).await; }
                None => pushing = false,
            },
            _ = reload.notified() => {
                tracing::info!("SIGHUP: reading {} again", cfg.bundle.display());
                match bundle::read_file(&cfg.bundle) {
                    Ok(bytes) => {
                        judge(&deployer, &links, Offer { origin: Origin::Reload(cfg.bundle.clone()), bytes }).await;
                    }
                    Err(e) => tracing::warn!("reload: bundle {}: {e}", cfg.bundle.display()),
                }
                if let Some(d) = &drop_dir {
                    // a reload takes what is there now, stable or not yet seen
                    for p in scan(d, &mut seen, true) {
                        take_file(&deployer, &links, p).await;
                    }
                }
            }
            _ = tick.tick(), if drop_dir.is_some() => {
                if let Some(d) = &drop_dir {
                    for p in scan(d, &mut seen, false) {
                        take_file(&deployer, &links, p).await;
                    }
                }
            }
        }
    }
}

/// Judges one offer; true when it runs now (taken or already running).
async fn judge(deployer: &Arc<Mutex<Deployer>>, links: &Links, o: Offer) -> bool {
    let (deployer, current) = (deployer.clone(), links.current.clone());
    let origin = o.origin.clone();
    let running = current.get();
    let result = tokio::task::spawn_blocking(move || {
        let mut d = deployer.lock().unwrap_or_else(|p| p.into_inner());
        d.offer(&o.bytes, Some(&running))
    })
    .await;
    let old = links.current.get().describe();
    match result {
        Ok(Ok(Outcome::Running)) => {
            tracing::info!("{origin}: {old} already running");
            true
        }
        Ok(Ok(Outcome::Swapped(d))) => {
            tracing::info!(
                "{origin}: now running {} (was {old}; frames already started finish on it)",
                d.describe()
            );
            links.current.set(Arc::new(*d));
            links.stats.bundles_accepted.fetch_add(1, Ordering::Relaxed);
            links.changed.notify_one();
            true
        }
        Ok(Err(r)) => {
            tracing::warn!("{origin} refused: {r}; still running {old}");
            links.stats.refused(format!("{origin}: {r}"));
            false
        }
        Err(e) => {
            tracing::error!("{origin}: judging it failed: {e}; still running {old}");
            links.stats.refused(format!("{origin}: {e}"));
            false
        }
    }
}

/// A dropped file: taken (and removed) or refused (renamed `*.refused`, kept for the
/// operator).
async fn take_file(deployer: &Arc<Mutex<Deployer>>, links: &Links, p: PathBuf) {
    let origin = Origin::Drop(p.clone());
    let taken = match fhecam_proto::files::read_limited(&p, MAX_BUNDLE_BYTES) {
        Ok(bytes) => judge(deployer, links, Offer { origin, bytes }).await,
        Err(e) => {
            tracing::warn!("{origin} refused: {e}");
            links.stats.refused(format!("{origin}: {e}"));
            false
        }
    };
    let done = if taken {
        std::fs::remove_file(&p)
    } else {
        let mut to = p.clone().into_os_string();
        to.push(".refused");
        std::fs::rename(&p, to)
    };
    if let Err(e) = done {
        tracing::error!("{}: {e}", p.display());
    }
}

/// `*.bundle` regular files in `dir` whose size and modification time did not change
/// since the previous scan (a copy in progress is left alone), or all of them (`all`).
fn scan(dir: &Path, seen: &mut HashMap<PathBuf, (u64, SystemTime)>, all: bool) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("deploy.drop_dir {}: {e}", dir.display());
            return Vec::new();
        }
    };
    let mut ready = Vec::new();
    let mut now = HashMap::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "bundle") {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !m.is_file() {
            continue;
        }
        let sig = (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        if all || seen.get(&p) == Some(&sig) {
            ready.push(p);
        } else {
            now.insert(p, sig);
        }
    }
    *seen = now;
    ready.sort();
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_file_is_taken_once_it_stops_changing() {
        let d = tempfile::tempdir().unwrap();
        let mut seen = HashMap::new();
        let p = d.path().join("a.bundle");
        std::fs::write(&p, b"one").unwrap();
        std::fs::write(d.path().join("b.part"), b"x").unwrap();
        std::fs::create_dir(d.path().join("c.bundle")).unwrap();
        assert!(scan(d.path(), &mut seen, false).is_empty(), "first sight");
        std::fs::write(&p, b"one more").unwrap(); // still being written
        assert!(scan(d.path(), &mut seen, false).is_empty(), "changed");
        assert_eq!(scan(d.path(), &mut seen, false), vec![p.clone()]);
        // a reload takes it at once
        let mut fresh = HashMap::new();
        assert_eq!(scan(d.path(), &mut fresh, true), vec![p]);
    }
}
