//! Bundle offers while the daemon runs: MQTT pushes (handed over by the publisher), files
//! dropped into `deploy.drop_dir`, and SIGHUP (the configured bundle file again, and a scan
//! of the drop directory at once). Each offer is judged and loaded on a blocking thread
//! ([`Deployer::offer`]); an accepted one replaces [`Current`] for the next frame.

use super::config::{secs, EdgeConfig};
use super::deploy::{Current, Deployer, Outcome, Refusal};
use super::health::{Stage, BEAT};
use super::stats::{refusal, Stats};
use fhecam_proto::bundle::MAX_BUNDLE_BYTES;
use std::collections::HashMap;
use std::future::Future;
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
    /// The bundle: a pushed one shares the MQTT packet's buffer (never copied).
    pub bytes: bytes::Bytes,
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
    /// Beaten from the loop and while an offer is judged, for the watchdog.
    pub beat: Arc<Stage>,
}

/// Awaits `f`, beating meanwhile: judging a bundle takes seconds, on a blocking thread
/// that cannot hang on a file (see [`read_offer`]).
async fn beating<T>(beat: &Stage, f: impl Future<Output = T>) -> T {
    tokio::pin!(f);
    let mut tick = tokio::time::interval(BEAT);
    loop {
        tokio::select! {
            v = &mut f => return v,
            _ = tick.tick() => beat.beat(),
        }
    }
}

/// Reads a bundle file on a blocking thread: regular files only, opened non-blocking (a
/// FIFO in its place is refused at once), at most a bundle's size.
async fn read_offer(p: &Path) -> Result<Vec<u8>, String> {
    let path = p.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::files::read_regular(&path, MAX_BUNDLE_BYTES).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
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
    let keep_refused = cfg.deploy.as_ref().map_or(0, |d| d.keep_refused);
    let mut tick = tokio::time::interval(period);
    let mut beat_tick = tokio::time::interval(BEAT);
    let mut seen = HashMap::new();
    let mut pushing = true;
    let beat = links.beat.clone();
    loop {
        beat.beat();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = beat_tick.tick() => {}
            o = offers.recv(), if pushing => match o {
                Some(o) => { beating(&beat, judge(&deployer, &links, o)).await; }
                None => pushing = false,
            },
            _ = reload.notified() => {
                tracing::info!("SIGHUP: reading {} again", cfg.bundle.display());
                match beating(&beat, read_offer(&cfg.bundle)).await {
                    Ok(bytes) => {
                        let o = Offer { origin: Origin::Reload(cfg.bundle.clone()), bytes: bytes.into() };
                        beating(&beat, judge(&deployer, &links, o)).await;
                    }
                    Err(e) => {
                        links.stats.intake_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("reload: bundle {}: {e}", cfg.bundle.display());
                    }
                }
                if let Some(d) = &drop_dir {
                    // a reload takes what is there now, stable or not yet seen
                    for p in scan(d, &mut seen, true, &links.stats) {
                        beating(&beat, take_file(&deployer, &links, p, keep_refused)).await;
                    }
                }
            }
            _ = tick.tick(), if drop_dir.is_some() => {
                if let Some(d) = &drop_dir {
                    for p in scan(d, &mut seen, false, &links.stats) {
                        beating(&beat, take_file(&deployer, &links, p, keep_refused)).await;
                    }
                }
            }
        }
    }
}

/// Judges one offer; true when it runs now (taken or already running).
/// The metrics' label of a refusal.
fn refusal_code(r: &Refusal) -> &'static str {
    match r {
        Refusal::Older { .. } => refusal::ROLLBACK,
        Refusal::Conflict { .. } => refusal::CONFLICT,
        Refusal::Stale { .. } => refusal::STALE,
        Refusal::Invalid(_) => refusal::INVALID,
    }
}

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
            refuse(links, refusal_code(&r), &origin, r)
        }
        Err(e) => {
            tracing::error!("{origin}: judging it failed: {e}; still running {old}");
            refuse(links, refusal::INVALID, &origin, e)
        }
    }
}

/// Counts a refused offer under `code` (kept as the last refusal); always `false` (not taken).
fn refuse(links: &Links, code: &'static str, origin: &Origin, why: impl std::fmt::Display) -> bool {
    links.stats.refused(code, format!("{origin}: {why}"));
    false
}

/// A dropped file: taken (and removed) or refused (renamed `*.refused`, kept for the
/// operator; only the newest `keep_refused` are kept).
async fn take_file(
    deployer: &Arc<Mutex<Deployer>>,
    links: &Links,
    p: PathBuf,
    keep_refused: usize,
) {
    let origin = Origin::Drop(p.clone());
    let taken = match read_offer(&p).await {
        Ok(bytes) => {
            let bytes = bytes.into();
            judge(deployer, links, Offer { origin, bytes }).await
        }
        Err(e) => {
            tracing::warn!("{origin} refused: {e}");
            refuse(links, refusal::UNREADABLE, &origin, e)
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
        links.stats.intake_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!("{}: {e}", p.display());
    }
    if !taken {
        if let Some(dir) = p.parent() {
            prune_refused(dir, keep_refused, &links.stats);
        }
    }
}

/// Removes the oldest `*.refused` files of `dir` beyond `keep` (by modification time).
fn prune_refused(dir: &Path, keep: usize, stats: &Stats) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut refused: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "refused"))
        .filter_map(|p| {
            let m = std::fs::symlink_metadata(&p).ok().filter(|m| m.is_file())?;
            Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), p))
        })
        .collect();
    if refused.len() <= keep {
        return;
    }
    refused.sort();
    for (_, p) in &refused[..refused.len() - keep] {
        match std::fs::remove_file(p) {
            Ok(()) => tracing::info!(
                "{}: removed (more than deploy.keep_refused = {keep} refused files)",
                p.display()
            ),
            Err(e) => {
                stats.intake_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{}: {e}", p.display());
            }
        }
    }
}

/// `*.bundle` regular files in `dir` whose size and modification time did not change
/// since the previous scan (a copy in progress is left alone), or all of them (`all`).
fn scan(
    dir: &Path,
    seen: &mut HashMap<PathBuf, (u64, SystemTime)>,
    all: bool,
    stats: &Stats,
) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            stats.intake_errors.fetch_add(1, Ordering::Relaxed);
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
        let st = Stats::default();
        let mut seen = HashMap::new();
        let p = d.path().join("a.bundle");
        std::fs::write(&p, b"one").unwrap();
        std::fs::write(d.path().join("b.part"), b"x").unwrap();
        std::fs::create_dir(d.path().join("c.bundle")).unwrap();
        assert!(
            scan(d.path(), &mut seen, false, &st).is_empty(),
            "first sight"
        );
        std::fs::write(&p, b"one more").unwrap(); // still being written
        assert!(scan(d.path(), &mut seen, false, &st).is_empty(), "changed");
        assert_eq!(scan(d.path(), &mut seen, false, &st), vec![p.clone()]);
        // a reload takes it at once
        let mut fresh = HashMap::new();
        assert_eq!(scan(d.path(), &mut fresh, true, &st), vec![p]);
    }

    #[test]
    fn only_the_newest_refused_files_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let st = Stats::default();
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        for i in 0..5u64 {
            let p = d.path().join(format!("{i}.bundle.refused"));
            let f = std::fs::File::create(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i))
                .unwrap();
        }
        std::fs::write(d.path().join("x.bundle"), b"").unwrap();
        prune_refused(d.path(), 2, &st);
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["3.bundle.refused", "4.bundle.refused", "x.bundle"]);
    }
}
