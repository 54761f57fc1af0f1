//! The infer stage: workers that run the encrypted model on quantized frames, each a
//! thread around the runtime's FHE pool, and the drain that waits for them at shutdown
//! with a deadline estimated from the model.

use super::config::EdgeConfig;
use super::daemon::{EdgeError, Milestone};
use super::deploy::{Current, Deployed};
use super::health::Health;
use super::stats::Stats;
use fhecam_proto::ids::ModelId;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Wall seconds per PBS on one FHE thread assumed before any frame has finished. Not
/// measured: a conservative figure for a small ARM core, about 4× the 25–30 ms measured on
/// x86-64 (docs/BENCHMARKS.md), so a first frame is not abandoned on a slow camera.
pub const ASSUMED_PBS_S: f64 = 0.1;

/// How long a frame takes: the last finished frame's time, or before any finished, the
/// model's planned PBS at [`ASSUMED_PBS_S`] spread over the FHE threads and shared by the
/// frames in flight.
pub fn frame_estimate(
    last: Option<Duration>,
    planned_pbs: u64,
    threads: usize,
    in_flight: usize,
) -> Duration {
    last.unwrap_or_else(|| {
        Duration::from_secs_f64(
            planned_pbs as f64 * ASSUMED_PBS_S * in_flight.max(1) as f64 / threads.max(1) as f64,
        )
    })
}

/// How much longer than now the drain must wait for frames that have been running for
/// `elapsed`: their estimated remaining time × 1.25 (the margin for a noisy machine).
pub fn drain_extension(estimate: Duration, elapsed: &[Duration]) -> Duration {
    elapsed
        .iter()
        .map(|e| estimate.saturating_sub(*e).mul_f64(1.25))
        .max()
        .unwrap_or_default()
}

/// How often a running inference logs its progress.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(30);

/// A quantized frame, the model it is for, and its capture time (unix ms): the
/// preprocess stage's output.
pub struct Job {
    pub model: Arc<Deployed>,
    pub x: Vec<u8>,
    pub timestamp_ms: u64,
}

/// A finished inference: what the infer stage knows of its envelope. The publisher seals
/// it (device, camera, the outbox's epoch and sequence number) as it enters the outbox.
pub struct Finished {
    pub model_id: ModelId,
    pub model_version: u32,
    pub frame_timestamp_ms: u64,
    pub ciphertext: Vec<u8>,
}

/// The infer stage's shared input: idle workers take turns waiting on it.
type JobQueue = Arc<Mutex<std_mpsc::Receiver<Job>>>;

/// What the workers share, and what the drain reads.
pub struct InferCtx {
    current: Arc<Current>,
    input_mode: fhecam_engine::fhe::eval::InputMode,
    progress: Progress,
}

/// What the drain deadline is estimated from.
struct Progress {
    /// Per worker: when its current frame started.
    started: Vec<Mutex<Option<Instant>>>,
    /// How long the last finished frame took.
    last: Mutex<Option<Duration>>,
}

impl Progress {
    fn set_started(&self, worker: usize, at: Option<Instant>) {
        if let Ok(mut s) = self.started[worker].lock() {
            *s = at;
        }
    }

    /// Time already spent by each frame in flight.
    fn elapsed(&self) -> Vec<Duration> {
        self.started
            .iter()
            .filter_map(|s| s.lock().ok().and_then(|s| s.map(|t| t.elapsed())))
            .collect()
    }
}

/// Starts `cfg.infer.max_in_flight` workers (our own threads around the runtime's FHE
/// pool) taking jobs from `jobs`, each registered in `health`.
pub fn spawn_workers(
    cfg: &EdgeConfig,
    current: Arc<Current>,
    jobs: std_mpsc::Receiver<Job>,
    out: &mpsc::Sender<Finished>,
    stats: &Arc<Stats>,
    health: &Health,
) -> Result<(Arc<InferCtx>, Vec<JoinHandle<()>>), EdgeError> {
    let ctx = Arc::new(InferCtx {
        input_mode: cfg.infer.input_mode,
        current,
        progress: Progress {
            started: (0..cfg.infer.max_in_flight)
                .map(|_| Mutex::new(None))
                .collect(),
            last: Mutex::new(None),
        },
    });
    let jobs = Arc::new(Mutex::new(jobs));
    let workers = (0..cfg.infer.max_in_flight)
        .map(|i| {
            let (ctx, rx, tx, stats) = (ctx.clone(), jobs.clone(), out.clone(), stats.clone());
            let (_, guard) = health.stage(format!("infer-{i}"), false);
            std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || {
                    let _guard = guard;
                    infer_worker(ctx, i, rx, tx, stats)
                })
                .map_err(|e| EdgeError::Thread(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok((ctx, workers))
}

fn infer_worker(
    ctx: Arc<InferCtx>,
    worker: usize,
    input: JobQueue,
    out: mpsc::Sender<Finished>,
    stats: Arc<Stats>,
) {
    loop {
        // the lock is held only while waiting: the next idle worker queues behind it
        let next = input.lock().map(|rx| rx.recv());
        let Job {
            model,
            x,
            timestamp_ms: ts,
        } = match next {
            Ok(Ok(v)) => v,
            _ => return,
        };
        let t = Instant::now();
        ctx.progress.set_started(worker, Some(t));
        // a frame takes minutes: say how far it is (PBS done / planned) every half minute
        let result = model
            .rt
            .infer_watched(
                model.rt.frame_input(ctx.input_mode, &x).as_frame(),
                PROGRESS_LOG_EVERY,
                &|done, planned| {
                    if done < planned {
                        tracing::info!(
                            "inference in progress: {done}/{planned} PBS after {:.0} s",
                            t.elapsed().as_secs_f64()
                        );
                    }
                },
            )
            .and_then(|(o, s)| Ok((o.to_bytes()?, s)));
        ctx.progress.set_started(worker, None);
        match result {
            Ok((ciphertext, s)) => {
                if let Ok(mut last) = ctx.progress.last.lock() {
                    *last = Some(t.elapsed());
                }
                tracing::info!(
                    "inference done: {} PBS in {:.1} s",
                    s.pbs,
                    t.elapsed().as_secs_f64()
                );
                stats.pbs_done.fetch_add(s.pbs, Ordering::Relaxed);
                stats.inference_seconds.observe(t.elapsed());
                let done = Finished {
                    model_id: model.header.model_id,
                    model_version: model.header.version,
                    frame_timestamp_ms: ts,
                    ciphertext,
                };
                if out.blocking_send(done).is_err() {
                    return;
                }
            }
            Err(e) => {
                stats.infer_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("inference failed: {e}");
            }
        }
    }
}

/// Joins the infer workers. With a stop request (`floor` set) the deadline is the later of
/// `floor` from now and the in-flight frames' estimated end, re-estimated as frames start,
/// and announced through [`Milestone::Draining`]; past it a frame is abandoned (its raw
/// frame is never persisted, so it cannot be resumed).
pub fn drain(
    workers: Vec<JoinHandle<()>>,
    floor: Option<Duration>,
    ctx: &InferCtx,
    milestone: &(dyn Fn(Milestone) + Send + Sync),
) -> bool {
    let mut panicked = false;
    let (pbs, threads) = {
        let m = ctx.current.get();
        (m.planned_pbs, m.rt.threads())
    };
    let mut deadline = floor.map(|f| Instant::now() + f);
    let mut announced: Option<(Instant, Instant)> = None; // (deadline, when)
    for w in workers {
        loop {
            if w.is_finished() {
                panicked |= w.join().is_err();
                break;
            }
            if let Some(d) = deadline.as_mut() {
                let now = Instant::now();
                let elapsed = ctx.progress.elapsed();
                let last = ctx.progress.last.lock().ok().and_then(|l| *l);
                let est = frame_estimate(last, pbs, threads, elapsed.len());
                *d = (*d).max(now + drain_extension(est, &elapsed));
                if now >= *d {
                    // detached: the process exits without it
                    tracing::warn!(
                        "an inference still running after the drain deadline is abandoned"
                    );
                    break;
                }
                // announce a new deadline at once, the same one every 10 s
                let stale = announced.is_none_or(|(ad, at)| {
                    ad != *d || now.duration_since(at) >= Duration::from_secs(10)
                });
                if stale {
                    if announced.is_none_or(|(ad, _)| ad != *d) {
                        tracing::info!(
                            "draining: {} in flight, deadline in {:.0} s (frame estimate {:.0} s{})",
                            elapsed.len(),
                            (*d - now).as_secs_f64(),
                            est.as_secs_f64(),
                            if last.is_some() { ", measured" } else { ", from the planned PBS" }
                        );
                    }
                    milestone(Milestone::Draining(*d - now));
                    announced = Some((*d, now));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panicked
}
