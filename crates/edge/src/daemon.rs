//! The daemon: source → preprocess → infer → publish, each stage on its own thread or task,
//! joined by bounded channels with an explicit policy:
//!
//! - source → preprocess: capacity 1; a frame arriving while the previous one is still
//!   being preprocessed is dropped (`frames_dropped_preprocess`);
//! - preprocess → infer: a rendezvous; a frame that finds every inference slot busy is
//!   dropped (`frames_dropped_busy`) — the camera only ever runs the newest frames;
//! - infer → publish: bounded, blocking: a finished inference is never dropped; the
//!   publisher writes it to the on-disk outbox before anything else.
//!
//! One cancellation path: the token stops the source; each stage ends when its input
//! closes, so in-flight inferences finish and reach the outbox; then the publisher
//! announces `offline` and disconnects. The drain deadline follows the model (see
//! [`drain_extension`]), with `drain_timeout_s` as its floor.
//!
//! Supervision: the publisher and the intake handle their own errors (logged, counted,
//! retried with backoff); if either task ends before the source (an error it cannot
//! handle, a panic), [`run`] logs why, stops the source and returns an error at once, so
//! the process exits non-zero and systemd restarts it. Every stage is registered in a
//! [`Health`], which the caller consults before feeding systemd's watchdog.

use super::config::{secs, EdgeConfig};
use super::deploy::{Current, DeployError, Deployed, Deployer};
use super::gate::{Decision, Gate};
use super::health::Health;
use super::intake::{self, Links, Offer};
use super::outbox::Outbox;
use super::publish::{self, Finished, PublishEvent};
use super::source::{self, Frame, SourceEnd, SourceOptions};
use super::stats::{Snapshot, Stats};
use fhecam_engine::fhe::FheError;
use fhecam_proto::bundle;
use fhecam_proto::wire::envelope::Envelope;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum EdgeError {
    #[error("bundle {path}: {source}")]
    Bundle {
        path: String,
        source: bundle::BundleError,
    },
    #[error("owner key {path}: {source}")]
    OwnerKey {
        path: String,
        source: bundle::BundleError,
    },
    #[error("FHE runtime: {0}")]
    Runtime(#[from] FheError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
    #[error(transparent)]
    Outbox(#[from] super::outbox::OutboxError),
    #[error("a daemon thread failed: {0}")]
    Thread(String),
    #[error("the {stage} stage stopped: {why}")]
    Stage { stage: &'static str, why: String },
}

/// Milestones, for systemd's READY=1 and for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    BundleLoaded,
    PipelinePlaying,
    BrokerConnected,
    BrokerDisconnected,
    /// Stopping: in-flight inferences may run this much longer (repeated while draining,
    /// so systemd's stop timeout can be extended).
    Draining(Duration),
}

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

/// How the run ended, with the final counters.
#[derive(Debug)]
pub struct RunReport {
    pub end: SourceEnd,
    pub stats: Snapshot,
}

/// Loads and verifies the bundle named in the config (also used by `fhecam validate`).
pub fn load_bundle(cfg: &EdgeConfig) -> Result<bundle::LoadedBundle, EdgeError> {
    let owner = bundle::read_owner_key(&cfg.owner_key).map_err(|source| EdgeError::OwnerKey {
        path: cfg.owner_key.display().to_string(),
        source,
    })?;
    bundle::load_file(&cfg.bundle, &owner).map_err(|source| EdgeError::Bundle {
        path: cfg.bundle.display().to_string(),
        source,
    })
}

fn preprocess_stage(
    frames: std_mpsc::Receiver<Frame>,
    to_infer: std_mpsc::SyncSender<Job>,
    every_frame: bool,
    current: Arc<Current>,
    mut gate: Gate,
    stats: Arc<Stats>,
) {
    for frame in frames {
        // the frame is bound here to the model it is preprocessed for, until it finishes
        let model = current.get();
        let spec = &model.header.input;
        let x = match crate::preprocess::intensities(&frame.image, spec) {
            Ok(x) => x,
            Err(e) => {
                stats.preprocess_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("preprocess: {e}");
                continue;
            }
        };
        match gate.decide(&x, Instant::now()) {
            Decision::Accept => {}
            Decision::Interval => {
                stats
                    .frames_skipped_interval
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Decision::Static => {
                stats.frames_skipped_static.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        let q = spec.quantize(&x);
        let job = Job {
            model,
            x: q,
            timestamp_ms: frame.timestamp_ms,
        };
        if every_frame {
            if to_infer.send(job).is_err() {
                return;
            }
            continue;
        }
        match to_infer.try_send(job) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => {
                stats.frames_dropped_busy.fetch_add(1, Ordering::Relaxed);
                gate.forget();
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => return,
        }
    }
}

/// How often a running inference logs its progress.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(30);

/// A quantized frame, the model it is for, and its capture time (unix ms).
struct Job {
    model: Arc<Deployed>,
    x: Vec<u8>,
    timestamp_ms: u64,
}
/// The infer stage's shared input: idle workers take turns waiting on it.
type JobQueue = Arc<Mutex<std_mpsc::Receiver<Job>>>;

struct InferCtx {
    current: Arc<Current>,
    input_mode: fhecam_engine::fhe::eval::InputMode,
    device_id: String,
    camera_id: String,
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
                let envelope = Envelope {
                    device_id: ctx.device_id.clone(),
                    camera_id: ctx.camera_id.clone(),
                    model_id: model.header.model_id,
                    model_version: model.header.version,
                    sequence: 0, // given by the outbox
                    epoch: 0,    // likewise
                    frame_timestamp_ms: ts,
                    ciphertext,
                };
                if out.blocking_send(Finished { envelope }).is_err() {
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
fn drain(
    workers: Vec<std::thread::JoinHandle<()>>,
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

/// Runs the daemon until the source ends (end of stream) or `cancel` fires. `milestone`
/// is called from any thread as the daemon comes up; `reload` (SIGHUP) offers the
/// configured bundle file again and scans the drop directory. `health` gets every stage
/// registered (see [`Health::check`]).
pub async fn run(
    cfg: EdgeConfig,
    cancel: CancellationToken,
    reload: Arc<Notify>,
    milestone: Arc<dyn Fn(Milestone) + Send + Sync>,
    health: Arc<Health>,
) -> Result<RunReport, EdgeError> {
    let stats = Arc::new(Stats::default());
    let cfg = Arc::new(cfg);

    // Everything that can fail on bad files fails here, before any thread starts.
    let (deployer, first) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || -> Result<_, EdgeError> {
            let owner =
                bundle::read_owner_key(&cfg.owner_key).map_err(|source| EdgeError::OwnerKey {
                    path: cfg.owner_key.display().to_string(),
                    source,
                })?;
            Ok(Deployer::start(&cfg, owner)?)
        })
        .await
        .map_err(|e| EdgeError::Thread(e.to_string()))??
    };
    let outbox = Outbox::open(
        &cfg.outbox.dir,
        cfg.outbox.max_entries,
        fhecam_proto::wire::envelope::MAX_ENVELOPE_BYTES as u64,
    )?;
    let header = &first.header;
    tracing::info!(
        "bundle {} version {} ({}) loaded: input {}x{}x{} ({} input), {} PBS per frame, {} FHE threads",
        header.name,
        header.version,
        header.model_id,
        header.input.channels,
        header.input.height,
        header.input.width,
        cfg.infer.input_mode.name(),
        first.planned_pbs,
        first.rt.threads()
    );
    let current = Arc::new(Current::new(first));
    milestone(Milestone::BundleLoaded);

    // bundle intake: pushes (through the publisher), dropped files, SIGHUP
    let push = cfg.deploy.as_ref().is_some_and(|d| d.push);
    let (offer_tx, offer_rx) = mpsc::channel::<Offer>(intake::OFFER_QUEUE);
    let changed = Arc::new(Notify::new());
    let intake_stop = CancellationToken::new();
    let mut intake = {
        let (beat, guard) = health.stage("intake", true);
        let links = Links {
            current: current.clone(),
            changed: changed.clone(),
            stats: stats.clone(),
            beat,
        };
        let run = intake::run(
            deployer,
            cfg.clone(),
            links,
            offer_rx,
            reload,
            intake_stop.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            run.await
        })
    };

    // publish stage
    let (fin_tx, fin_rx) = mpsc::channel::<Finished>(cfg.infer.max_in_flight + 1);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let linger = secs(cfg.mqtt.conn.keep_alive_s as f64).min(Duration::from_secs(10));
    let pub_stop = CancellationToken::new();
    let mut publisher = {
        let (cfg, stop) = (cfg.clone(), pub_stop.clone());
        let (beat, guard) = health.stage("publisher", true);
        let links = publish::Links {
            stats: stats.clone(),
            current: current.clone(),
            changed,
            offers: push.then_some(offer_tx),
            beat,
        };
        tokio::spawn(async move {
            let _guard = guard;
            publish::run(&cfg, outbox, links, fin_rx, ev_tx, linger, stop).await
        })
    };
    {
        let milestone = milestone.clone();
        tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                milestone(match ev {
                    PublishEvent::Connected => Milestone::BrokerConnected,
                    PublishEvent::Disconnected => Milestone::BrokerDisconnected,
                });
            }
        });
    }

    // infer stage: our own threads around the runtime's FHE pool
    let ctx = Arc::new(InferCtx {
        input_mode: cfg.infer.input_mode,
        current: current.clone(),
        device_id: cfg.device_id.clone(),
        camera_id: cfg.camera_id.clone(),
        progress: Progress {
            started: (0..cfg.infer.max_in_flight)
                .map(|_| Mutex::new(None))
                .collect(),
            last: Mutex::new(None),
        },
    });
    let (inf_tx, inf_rx) = std_mpsc::sync_channel::<Job>(0);
    let inf_rx = Arc::new(Mutex::new(inf_rx));
    let workers: Vec<_> = (0..cfg.infer.max_in_flight)
        .map(|i| {
            let (ctx, rx, tx, stats) = (ctx.clone(), inf_rx.clone(), fin_tx.clone(), stats.clone());
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
    drop(fin_tx);

    // preprocess stage
    let (frame_tx, frame_rx) = std_mpsc::sync_channel::<Frame>(1);
    let gate = Gate::new(
        secs(cfg.preprocess.sample_interval_s),
        cfg.preprocess.motion_threshold,
    );
    let pre = {
        let (current, stats) = (current.clone(), stats.clone());
        let every_frame = cfg.source.every_frame;
        let (_, guard) = health.stage("preprocess", false);
        std::thread::Builder::new()
            .name("preprocess".into())
            .spawn(move || {
                let _guard = guard;
                preprocess_stage(frame_rx, inf_tx, every_frame, current, gate, stats)
            })
            .map_err(|e| EdgeError::Thread(e.to_string()))?
    };

    // source stage
    let opts = SourceOptions {
        pipeline: cfg.source.pipeline.clone(),
        every_frame: cfg.source.every_frame,
        stall_timeout: secs(cfg.source.stall_timeout_s),
        backoff_initial: secs(cfg.source.restart_backoff_initial_s),
        backoff_max: secs(cfg.source.restart_backoff_max_s),
    };
    let mut src = {
        let (stats, cancel, milestone) = (stats.clone(), cancel.clone(), milestone.clone());
        let (_, guard) = health.stage("source", false);
        let health = health.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let mut playing = || milestone(Milestone::PipelinePlaying);
            let every_frame = opts.every_frame;
            let mut deliver = |f: Frame| match frame_tx.try_send(f) {
                Ok(()) => true,
                Err(std_mpsc::TrySendError::Full(f)) if every_frame => frame_tx.send(f).is_ok(),
                Err(std_mpsc::TrySendError::Full(_)) => {
                    stats
                        .frames_dropped_preprocess
                        .fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(std_mpsc::TrySendError::Disconnected(_)) => false,
            };
            let end = source::run(&opts, &stats, &cancel, &mut playing, &mut deliver);
            // the daemon stops with its source: the stages now end in order
            health.stopping();
            end
        })
    };
    // the source ends first (a stop request, end of stream); a task ending before the
    // daemon stops is a failure it cannot recover from in place. Once the source has
    // ended, the publisher may finish first (nothing left to send): that is the normal end.
    let mut published = None;
    let mut intake_ended = false;
    let failed = loop {
        tokio::select! {
            end = &mut src => break Ok(end.map_err(|e| EdgeError::Thread(e.to_string()))?),
            r = &mut publisher, if published.is_none() => {
                if health.is_stopping() {
                    published = Some(r);
                    continue;
                }
                break Err(("publisher", match r {
                    Ok(Ok(())) => "ended early".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                }));
            }
            r = &mut intake, if !intake_ended => {
                intake_ended = true;
                if health.is_stopping() {
                    continue;
                }
                break Err(("intake", match r {
                    Ok(()) => "ended early".to_string(),
                    Err(e) => e.to_string(),
                }));
            }
        }
    };
    let end = match failed {
        Ok(end) => end,
        Err((stage, why)) => {
            tracing::error!(
                "the {stage} stage stopped: {why}; exiting so that the service is restarted"
            );
            health.stopping();
            cancel.cancel();
            // the source notices within a poll (100 ms); the FHE threads are left behind
            let _ = tokio::time::timeout(Duration::from_secs(5), src).await;
            return Err(EdgeError::Stage { stage, why });
        }
    };
    health.stopping();
    match &end {
        Ok(e) => tracing::info!("source ended: {e:?}; draining"),
        Err(e) => tracing::error!("source failed: {e}; draining"),
    }

    // the source's sender is gone: the stages end in order as their inputs close
    // A stop request bounds the drain; a source that simply ended (a file played out)
    // has every frame it delivered finished, however long the queue.
    let floor = match &end {
        Ok(SourceEnd::Eos) => None,
        _ => Some(secs(cfg.infer.drain_timeout_s)),
    };
    let joined = tokio::task::spawn_blocking(move || {
        let pre = pre.join().is_err();
        drain(workers, floor, &ctx, &*milestone) || pre
    });
    let panicked = joined.await.unwrap_or(true);
    intake_stop.cancel();
    if !intake_ended {
        let _ = intake.await;
    }
    pub_stop.cancel();
    let published = match published {
        Some(r) => r,
        None => publisher.await,
    }
    .map_err(|e| EdgeError::Thread(e.to_string()))?;
    published?;
    let end = end?;
    if panicked {
        return Err(EdgeError::Thread(
            "the preprocess or an inference thread panicked (see the log)".into(),
        ));
    }
    Ok(RunReport {
        end,
        stats: stats.snapshot(),
    })
}
