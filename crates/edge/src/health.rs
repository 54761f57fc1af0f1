//! Liveness of the daemon's stages, for systemd's watchdog: the watchdog is fed only while
//! every stage is alive. Async stages (publisher, intake) beat at least every [`BEAT`]
//! from their own loop, so one that is wedged stops beating; thread stages (source,
//! preprocess, inference) hold an [`EndGuard`] that marks them ended when they return or
//! panic (the drop-guard shape of tokio's mini-redis).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often an async stage beats when idle.
pub const BEAT: Duration = Duration::from_millis(250);

/// One stage's state.
pub struct Stage {
    name: String,
    base: Instant,
    /// Milliseconds since `base` of the last beat (`u64::MAX`: this stage does not beat).
    last_ms: AtomicU64,
    ended: AtomicBool,
}

impl Stage {
    /// The stage made progress (or is idle in its loop) now.
    pub fn beat(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Marks its stage ended when dropped: when the thread or task holding it returns,
/// panics or is cancelled.
pub struct EndGuard(Arc<Stage>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

/// Every stage of one daemon run.
pub struct Health {
    base: Instant,
    stages: Mutex<Vec<Arc<Stage>>>,
    /// Set once the daemon stops on purpose: stages then end one by one, as they should.
    stopping: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            base: Instant::now(),
            stages: Mutex::default(),
            stopping: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Registers a stage; `beats`: it must also beat at least every watchdog period.
    pub fn stage(&self, name: impl Into<String>, beats: bool) -> (Arc<Stage>, EndGuard) {
        let s = Arc::new(Stage {
            name: name.into(),
            base: self.base,
            last_ms: AtomicU64::new(if beats { 0 } else { u64::MAX }),
            ended: AtomicBool::new(false),
        });
        if beats {
            s.beat();
        }
        if let Ok(mut v) = self.stages.lock() {
            v.push(s.clone());
        }
        (s.clone(), EndGuard(s))
    }

    /// The daemon is stopping on purpose: ended stages no longer count as failures.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// `Ok` while every stage is alive and every beating stage beat within `max_age`;
    /// otherwise which stage is not, and why.
    pub fn check(&self, max_age: Duration) -> Result<(), String> {
        if self.is_stopping() {
            return Ok(());
        }
        let now = self.base.elapsed().as_millis() as u64;
        let stages = self.stages.lock().map_err(|_| "health lock poisoned")?;
        for s in stages.iter() {
            if s.ended.load(Ordering::Relaxed) {
                return Err(format!("stage {} has stopped", s.name));
            }
            let last = s.last_ms.load(Ordering::Relaxed);
            if last != u64::MAX && now.saturating_sub(last) > max_age.as_millis() as u64 {
                return Err(format!(
                    "stage {} made no progress for {:.1} s",
                    s.name,
                    (now - last) as f64 / 1000.0
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_or_silent_stage_fails_the_check_until_stopping() {
        let h = Health::default();
        let (_t, guard) = h.stage("source", false);
        let (p, _pg) = h.stage("publisher", true);
        assert!(h.check(Duration::from_secs(1)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        let e = h.check(Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("publisher"), "{e}");
        p.beat();
        assert!(h.check(Duration::from_millis(10)).is_ok());
        drop(guard);
        let e = h.check(Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("source has stopped"), "{e}");
        h.stopping();
        assert!(h.check(Duration::from_secs(1)).is_ok());
    }
}
