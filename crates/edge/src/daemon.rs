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
//! [`infer::drain_extension`]), with `drain_timeout_s` as its floor.
//!
//! This module wires the stages and shuts them down; each stage has its own: [`source`]
//! (capture), [`prepare`] (preprocess), [`infer`], [`link`] (outbox and MQTT, with the
//! deployment pushes handed to [`intake`]).
//!
//! Supervision: the publisher and the intake handle their own errors (logged, counted,
//! retried with backoff); if either task ends before the source (an error it cannot
//! handle, a panic), [`run`] logs why, stops the source and returns an error at once, so
//! the process exits non-zero and systemd restarts it. Every stage is registered in a
//! [`Health`], which the caller consults before feeding systemd's watchdog.

use super::config::{secs, EdgeConfig};
use super::deploy::{Current, DeployError, Deployed, Deployer};
use super::gate::Gate;
use super::health::{EndGuard, Health};
use super::infer::{self, Finished, InferCtx, Job};
use super::intake::{self, Offer};
use super::link::{self, LinkError, LinkEvent};
use super::outbox::Outbox;
use super::prepare;
use super::source::{self, Frame, SourceEnd, SourceOptions};
use super::stats::{Snapshot, Stats};
use fhecam_engine::fhe::FheError;
use fhecam_proto::bundle;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
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
    Link(#[from] LinkError),
    #[error(transparent)]
    Outbox(#[from] super::outbox::OutboxError),
    #[error("a daemon thread failed: {0}")]
    Thread(String),
    #[error("the {stage} stage stopped: {why}")]
    Stage { stage: &'static str, why: String },
    #[error("{0}")]
    Metrics(String),
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
    let (deployer, first, outbox) = start(&cfg).await?;
    let current = Arc::new(Current::new(first));
    milestone(Milestone::BundleLoaded);
    let _metrics = serve_metrics(&cfg, &stats, &current).await?;

    // the tasks beside the stages: the bundle intake (pushes through the link, dropped
    // files, SIGHUP) and the MQTT link
    let push = cfg.deploy.as_ref().is_some_and(|d| d.push);
    let (offer_tx, offer_rx) = mpsc::channel::<Offer>(intake::OFFER_QUEUE);
    let changed = Arc::new(Notify::new());
    let (intake_stop, link_stop) = (CancellationToken::new(), CancellationToken::new());
    let intake = {
        let (beat, guard) = health.stage("intake", true);
        let links = intake::Links {
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
    let (fin_tx, fin_rx) = mpsc::channel::<Finished>(cfg.infer.max_in_flight + 1);
    let link = {
        let (beat, guard) = health.stage("publisher", true);
        let links = link::Links {
            stats: stats.clone(),
            current: current.clone(),
            changed,
            offers: push.then_some(offer_tx),
            beat,
        };
        spawn_link(&cfg, outbox, links, fin_rx, &milestone, guard, &link_stop)
    };
    let mut tasks = Tasks {
        link,
        link_stop,
        linked: None,
        intake,
        intake_stop,
        intake_ended: false,
    };

    // the stages, last to first: each holds the sender of the one before
    let (job_tx, job_rx) = std_mpsc::sync_channel::<Job>(0);
    let (ctx, workers) =
        infer::spawn_workers(&cfg, current.clone(), job_rx, &fin_tx, &stats, &health)?;
    drop(fin_tx);
    let (frame_tx, frame_rx) = std_mpsc::sync_channel::<Frame>(1);
    let pre = spawn_prepare(&cfg, frame_rx, job_tx, current, &stats, &health)?;
    let mut src = spawn_source(&cfg, frame_tx, &stats, &cancel, &milestone, &health);

    let end = match supervise(&mut src, &mut tasks, &health).await? {
        Ended::Source(end) => end,
        Ended::Failed(stage, why) => {
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
    let threads = Threads { pre, workers, ctx };
    let end = shut_down(&cfg, end, threads, tasks, milestone).await?;
    Ok(RunReport {
        end,
        stats: stats.snapshot(),
    })
}

/// The `/metrics` endpoint, when `[metrics]` asks for one.
async fn serve_metrics(
    cfg: &EdgeConfig,
    stats: &Arc<Stats>,
    current: &Arc<Current>,
) -> Result<Option<tokio_util::sync::DropGuard>, EdgeError> {
    let Some(mc) = &cfg.metrics else {
        return Ok(None);
    };
    // the endpoint stops when the guard, held by `run`, drops
    let stop = CancellationToken::new();
    let mode = cfg.infer.input_mode.name();
    let x = super::metrics::exporter(stats.clone(), current.clone(), mode);
    fhecam_metrics::serve(mc, Arc::new(x), stop.clone())
        .await
        .map_err(|e| EdgeError::Metrics(e.to_string()))?;
    Ok(Some(stop.drop_guard()))
}

/// Everything that can fail on bad files fails here, before any thread starts: the owner
/// key, the model to start with (configured or deployed since), the outbox.
async fn start(cfg: &Arc<EdgeConfig>) -> Result<(Deployer, Deployed, Outbox), EdgeError> {
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
    Ok((deployer, first, outbox))
}

/// The publish stage: the MQTT link, its connection events passed on as milestones.
fn spawn_link(
    cfg: &Arc<EdgeConfig>,
    outbox: Outbox,
    links: link::Links,
    input: mpsc::Receiver<Finished>,
    milestone: &Arc<dyn Fn(Milestone) + Send + Sync>,
    guard: EndGuard,
    stop: &CancellationToken,
) -> LinkTask {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let linger = secs(cfg.mqtt.conn.keep_alive_s as f64).min(Duration::from_secs(10));
    let milestone = milestone.clone();
    tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            milestone(match ev {
                LinkEvent::Connected => Milestone::BrokerConnected,
                LinkEvent::Disconnected => Milestone::BrokerDisconnected,
            });
        }
    });
    let (cfg, stop) = (cfg.clone(), stop.clone());
    tokio::spawn(async move {
        let _guard = guard;
        link::run(&cfg, outbox, links, input, ev_tx, linger, stop).await
    })
}

fn spawn_prepare(
    cfg: &EdgeConfig,
    frames: std_mpsc::Receiver<Frame>,
    jobs: std_mpsc::SyncSender<Job>,
    current: Arc<Current>,
    stats: &Arc<Stats>,
    health: &Health,
) -> Result<std::thread::JoinHandle<()>, EdgeError> {
    let gate = Gate::new(
        secs(cfg.preprocess.sample_interval_s),
        cfg.preprocess.motion_threshold,
    );
    let stats = stats.clone();
    let every_frame = cfg.source.every_frame;
    let (_, guard) = health.stage("preprocess", false);
    std::thread::Builder::new()
        .name("preprocess".into())
        .spawn(move || {
            let _guard = guard;
            prepare::run(frames, jobs, every_frame, current, gate, stats)
        })
        .map_err(|e| EdgeError::Thread(e.to_string()))
}

type SourceTask = JoinHandle<Result<SourceEnd, source::SourceError>>;
type LinkTask = JoinHandle<Result<(), LinkError>>;

/// The source stage, on a blocking thread: a frame arriving while the preprocess stage is
/// busy is dropped (counted), unless `every_frame` makes it wait.
fn spawn_source(
    cfg: &EdgeConfig,
    frames: std_mpsc::SyncSender<Frame>,
    stats: &Arc<Stats>,
    cancel: &CancellationToken,
    milestone: &Arc<dyn Fn(Milestone) + Send + Sync>,
    health: &Arc<Health>,
) -> SourceTask {
    let opts = SourceOptions {
        pipeline: cfg.source.pipeline.clone(),
        every_frame: cfg.source.every_frame,
        stall_timeout: secs(cfg.source.stall_timeout_s),
        backoff_initial: secs(cfg.source.restart_backoff_initial_s),
        backoff_max: secs(cfg.source.restart_backoff_max_s),
    };
    let (stats, cancel, milestone) = (stats.clone(), cancel.clone(), milestone.clone());
    let (_, guard) = health.stage("source", false);
    let health = health.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let mut playing = || milestone(Milestone::PipelinePlaying);
        let every_frame = opts.every_frame;
        let mut deliver = |f: Frame| match frames.try_send(f) {
            Ok(()) => true,
            Err(std_mpsc::TrySendError::Full(f)) if every_frame => frames.send(f).is_ok(),
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
}

/// The tasks that run beside the stages, their stop tokens, and whether they ended.
struct Tasks {
    link: LinkTask,
    link_stop: CancellationToken,
    /// The link's result, when it ended during the shutdown.
    linked: Option<Result<Result<(), LinkError>, tokio::task::JoinError>>,
    intake: JoinHandle<()>,
    intake_stop: CancellationToken,
    intake_ended: bool,
}

/// The threads of the preprocess and infer stages, joined in order at shutdown.
struct Threads {
    pre: std::thread::JoinHandle<()>,
    workers: Vec<std::thread::JoinHandle<()>>,
    ctx: Arc<InferCtx>,
}

enum Ended {
    /// The source ended first: the normal way to stop.
    Source(Result<SourceEnd, source::SourceError>),
    /// A task ended before the daemon was stopping: (stage, why).
    Failed(&'static str, String),
}

/// Waits for the source to end. A task ending before the daemon stops is a failure it
/// cannot recover from in place. Once the source has ended, the link may finish first
/// (nothing left to send): that is the normal end.
async fn supervise(
    src: &mut SourceTask,
    t: &mut Tasks,
    health: &Health,
) -> Result<Ended, EdgeError> {
    loop {
        tokio::select! {
            end = &mut *src => {
                return Ok(Ended::Source(end.map_err(|e| EdgeError::Thread(e.to_string()))?));
            }
            r = &mut t.link, if t.linked.is_none() => {
                if health.is_stopping() {
                    t.linked = Some(r);
                    continue;
                }
                return Ok(Ended::Failed("publisher", match r {
                    Ok(Ok(())) => "ended early".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                }));
            }
            r = &mut t.intake, if !t.intake_ended => {
                t.intake_ended = true;
                if health.is_stopping() {
                    continue;
                }
                return Ok(Ended::Failed("intake", match r {
                    Ok(()) => "ended early".to_string(),
                    Err(e) => e.to_string(),
                }));
            }
        }
    }
}

/// The source's sender is gone: the stages end in order as their inputs close, then the
/// intake and the link are stopped. A stop request bounds the drain; a source that simply
/// ended (a file played out) has every frame it delivered finished, however long the
/// queue.
async fn shut_down(
    cfg: &EdgeConfig,
    end: Result<SourceEnd, source::SourceError>,
    threads: Threads,
    t: Tasks,
    milestone: Arc<dyn Fn(Milestone) + Send + Sync>,
) -> Result<SourceEnd, EdgeError> {
    let floor = match &end {
        Ok(SourceEnd::Eos) => None,
        _ => Some(secs(cfg.infer.drain_timeout_s)),
    };
    let joined = tokio::task::spawn_blocking(move || {
        let pre = threads.pre.join().is_err();
        infer::drain(threads.workers, floor, &threads.ctx, &*milestone) || pre
    });
    let panicked = joined.await.unwrap_or(true);
    t.intake_stop.cancel();
    if !t.intake_ended {
        let _ = t.intake.await;
    }
    t.link_stop.cancel();
    let linked = match t.linked {
        Some(r) => r,
        None => t.link.await,
    }
    .map_err(|e| EdgeError::Thread(e.to_string()))?;
    linked?;
    let end = end?;
    if panicked {
        return Err(EdgeError::Thread(
            "the preprocess or an inference thread panicked (see the log)".into(),
        ));
    }
    Ok(end)
}
