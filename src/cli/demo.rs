//! `fhecam demo`: the whole product on one machine. The owner trains (or loads) a built-in
//! digits model (by default the secret-table network), protects and deploys it; a broker starts on a free loopback port (or `--broker`);
//! the edge daemon plays real test digits through a GStreamer pipeline and publishes
//! encrypted inferences; the backend agent decrypts them and feeds the cockpit topic, where
//! this command listens and compares each label with the truth and the plaintext model.

use anyhow::{bail, Context, Result};
use fhecam::broker::LocalBroker;
use fhecam::edge::config::{
    EdgeConfig, EdgeTopics, InferConfig, MqttConfig, OutboxConfig, PreprocessConfig, SourceConfig,
};
use fhecam::{preprocess, reference, train, train_tables};
use fhecam_proto::settings::Settings as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The built-in models the demo can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoModel {
    /// Secret-table network: every neuron one lookup table the owner encrypts (0.9645,
    /// 1,136 PBS per frame with encrypted input).
    Tables,
    /// CNN, 4 channels (0.93, about 3,200 PBS per frame).
    Fast,
    /// CNN, 16 channels (0.956, about 12,900 PBS per frame).
    Reference,
}

impl DemoModel {
    pub fn name(self) -> &'static str {
        match self {
            DemoModel::Tables => "tables",
            DemoModel::Fast => "fast",
            DemoModel::Reference => "reference",
        }
    }

    /// The model, from the cache or trained on first use.
    pub fn model(self) -> Result<fhecam::model::Model> {
        match self {
            DemoModel::Tables => tables_model(&train_tables::TablesConfig::default()),
            DemoModel::Fast => Ok(crate::reference_model("digits", train::Preset::Fast)?.0),
            DemoModel::Reference => {
                Ok(crate::reference_model("digits", train::Preset::Reference)?.0)
            }
        }
    }
}

/// The tables preset, cached under a name that hashes its whole recipe, so a changed
/// recipe never reuses a stale model.
fn tables_model(cfg: &train_tables::TablesConfig) -> Result<fhecam::model::Model> {
    use sha2::Digest;
    let recipe = hex::encode(&sha2::Sha256::digest(format!("{cfg:?}").as_bytes())[..8]);
    let path = crate::cache_dir()
        .join("models")
        .join(format!("digits-tables-{recipe}.json"));
    if let Ok(m) = crate::load_model(&path) {
        return Ok(m);
    }
    eprintln!(
        "training the secret-table digits model (about a minute; cached in {})",
        path.display()
    );
    let (tr, te) = crate::load_split("digits")?;
    let r = super::train::with_progress(cfg.epochs, |p| train_tables::train(cfg, &tr, &te, p))?;
    crate::save_model(&r.model, &path, Some(r.scores.accuracy_float))?;
    Ok(r.model)
}

pub struct DemoArgs {
    pub frames: usize,
    pub threads: usize,
    pub preset: DemoModel,
    pub broker: Option<String>,
    pub keep: Option<PathBuf>,
}

/// A mosquitto of the demo's own on a free loopback port.
fn start_mosquitto(dir: &Path) -> Result<(LocalBroker, u16)> {
    let port = fhecam::broker::free_port()?;
    let broker = LocalBroker::start(dir, port, "allow_anonymous true\npersistence false\n")
        .context("pass --broker HOST:PORT to use a broker of your own")?;
    Ok((broker, port))
}

fn parse_broker(s: &str) -> Result<(String, u16)> {
    let s = s.strip_prefix("mqtt://").unwrap_or(s);
    let (h, p) = s
        .rsplit_once(':')
        .with_context(|| format!("--broker {s:?}: expected HOST:PORT"))?;
    Ok((h.to_string(), p.parse().context("--broker: bad port")?))
}

pub fn run(args: DemoArgs, model: fhecam::model::Model, te: fhecam::data::Dataset) -> Result<()> {
    if args.frames == 0 || args.frames > te.len() {
        bail!("--frames must be 1..={}", te.len());
    }
    let work = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => std::env::temp_dir().join(format!("fhecam-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let result = run_in(&args, &model, &te, &work);
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("work directory kept: {}", work.display());
    }
    result
}

/// What the owner's side leaves for the camera and the backend.
struct Owned {
    db: PathBuf,
    id: fhecam::ids::ModelId,
    keys_dir: PathBuf,
    pass_file: PathBuf,
    bundle: PathBuf,
}

/// A cockpit result as received, with its latency from capture (s).
type Received = Option<(fhecam::wire::CockpitResult, f64)>;

fn run_in(
    args: &DemoArgs,
    model: &fhecam::model::Model,
    te: &fhecam::data::Dataset,
    work: &Path,
) -> Result<()> {
    let owned = protect_and_deploy(args, model, work)?;

    // ---- broker ----
    let (_mosquitto, host, port) = match &args.broker {
        Some(b) => {
            let (h, p) = parse_broker(b)?;
            (None, h, p)
        }
        None => {
            let (m, p) = start_mosquitto(work)?;
            (Some(m), "127.0.0.1".to_string(), p)
        }
    };
    println!("[broker] mqtt://{host}:{port}");

    let plain = write_frames(args.frames, model, te, work)?;
    let edge = edge_config(args, work, &owned, &host, port)?;
    println!("[edge] pipeline: {}", edge.source.pipeline);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let mut results = subscribe_cockpit(&host, port).await?;

        // ---- backend agent ----
        let mut acfg = fhecam::agent::AgentConfig::new(owned.db.clone(), work.join("agent-state.db"));
        acfg.passphrase_file = Some(owned.pass_file.clone());
        acfg.mqtt.conn.host = host.clone();
        acfg.mqtt.conn.port = port;
        acfg.mqtt.conn.client_id = Some(format!("demo-agent-{}", std::process::id()));
        // the demo checks the logits too, not only the label
        acfg.logits_for = vec![owned.id.to_string()];
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let agent = tokio::spawn(fhecam::agent::run(acfg, shutdown.clone(), Some(ready_tx)));
        let (cockpit, url) = start_cockpit(&host, port, &shutdown).await?;
        println!("[cockpit] {url} (the live fleet page)");
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .context("the backend agent did not subscribe in time")?
            .context("the backend agent stopped")?;
        println!("[backend] agent subscribed (MQTT v5, persistent session); results go to cockpit/<device>/<camera>");

        // ---- edge daemon ----
        let started = Instant::now();
        let milestone: Arc<dyn Fn(fhecam::edge::Milestone) + Send + Sync> = Arc::new(|_| {});
        let report = fhecam::edge::run(
            edge,
            shutdown.child_token(),
            Default::default(),
            milestone,
            Default::default(),
        )
        .await?;
        let edge_s = started.elapsed().as_secs_f64();
        println!(
            "[edge] done: {} inferences published in {:.1} s",
            report.stats.published, edge_s
        );

        let got = collect_results(&mut results, args.frames).await;
        let report = print_report(&got, &plain, te, edge_s);
        if args.keep.is_some() {
            println!("[cockpit] staying up at {url} with the broker and the agent; Ctrl-C stops");
            tokio::signal::ctrl_c().await?;
        }
        shutdown.cancel();
        cockpit.await??;
        let stats = agent.await??;
        println!(
            "[backend] agent: {} received, {} decrypted, {} duplicates, {} refused",
            stats.received, stats.decrypted, stats.duplicates, stats.dead_lettered
        );
        report
    })
}

/// The owner's side: the model written out, an owner key, a passphrase file, the model
/// protected into a fresh database and deployed as a signed bundle.
fn protect_and_deploy(args: &DemoArgs, model: &fhecam::model::Model, work: &Path) -> Result<Owned> {
    match model.macs()? {
        0 => println!(
            "[owner] {} digits model {:?}: secret lookup tables, no ct x ct MACs",
            args.preset.name(),
            model.name
        ),
        macs => println!(
            "[owner] {} digits model {:?}: {macs} ct x ct MACs",
            args.preset.name(),
            model.name
        ),
    }
    crate::print_plan(model)?;
    let model_path = work.join("model.json");
    std::fs::write(&model_path, serde_json::to_vec(model)?)?;
    let keys_dir = work.join("keys");
    super::owner::owner_key_init(&keys_dir)?;
    let pass_file = work.join("passphrase");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let pass = hex::encode(rand::random::<[u8; 16]>());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pass_file)?;
        f.write_all(pass.as_bytes())?;
    }
    let db = work.join("owner.db");
    let id = super::owner::protect(
        &model_path,
        &db,
        Some("digits".into()),
        Some(&pass_file),
        false,
    )?;
    let bundle = work.join("digits.bundle");
    super::owner::deploy(&db, &id, &keys_dir.join("owner.key"), Some(&bundle), None)?;
    Ok(Owned {
        db,
        id,
        keys_dir,
        pass_file,
        bundle,
    })
}

/// The cockpit page on a free loopback port, fed by the demo's broker.
async fn start_cockpit(
    host: &str,
    port: u16,
    shutdown: &CancellationToken,
) -> Result<(
    tokio::task::JoinHandle<Result<(), fhecam_cockpit::CockpitError>>,
    String,
)> {
    let mut cfg = fhecam_cockpit::CockpitConfig::default();
    cfg.mqtt.conn.host = host.into();
    cfg.mqtt.conn.port = port;
    cfg.http.listen = "127.0.0.1:0".into();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(fhecam_cockpit::run(cfg, shutdown.clone(), Some(tx)));
    let addr = rx.await.context("the cockpit did not start")?;
    Ok((task, format!("http://{addr}/")))
}

/// The camera's frames: real test digits as PNG files `frame<i>.png`, and the plaintext
/// model's label and logits on exactly what the daemon will see.
fn write_frames(
    frames: usize,
    model: &fhecam::model::Model,
    te: &fhecam::data::Dataset,
    work: &Path,
) -> Result<Vec<(usize, Vec<i64>)>> {
    let mut plain = Vec::new();
    for i in 0..frames {
        let px: Vec<u8> = te.images[i]
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let png = work.join(format!("frame{i}.png"));
        std::fs::write(&png, preprocess::encode_grey_png(&px, 8)?)?;
        let x = preprocess::preprocess_file(&png, &model.input)?;
        let logits = reference::evaluate(model, &x)?;
        plain.push((reference::argmax(&logits), logits));
    }
    Ok(plain)
}

/// The camera's configuration: the frames through a GStreamer pipeline, the bundle, the
/// broker; checked as `fhecam validate` would.
fn edge_config(
    args: &DemoArgs,
    work: &Path,
    owned: &Owned,
    host: &str,
    port: u16,
) -> Result<EdgeConfig> {
    let pipeline = format!(
        "multifilesrc location={} index=0 stop-index={} caps=image/png,framerate=1/1 ! pngdec ! videoconvert ! appsink",
        work.join("frame%d.png").display(),
        args.frames - 1
    );
    let edge = EdgeConfig {
        device_id: "demo-cam".into(),
        camera_id: "cam0".into(),
        bundle: owned.bundle.clone(),
        owner_key: owned.keys_dir.join("owner.pub"),
        source: SourceConfig {
            pipeline,
            every_frame: true,
            ..SourceConfig::default()
        },
        preprocess: PreprocessConfig::default(),
        infer: InferConfig {
            threads: args.threads,
            ..InferConfig::default()
        },
        mqtt: MqttConfig {
            conn: fhecam::mqtt::Connection {
                host: host.into(),
                port,
                ..Default::default()
            },
            role: EdgeTopics {
                stats_interval_s: 10.0,
                ..Default::default()
            },
        },
        outbox: OutboxConfig {
            dir: work.join("outbox"),
            ..OutboxConfig::default()
        },
        deploy: None,
        metrics: None,
    };
    edge.check()?;
    Ok(edge)
}

/// The cockpit: subscribed to `cockpit/#` before anything is published; every result with
/// the time it arrived.
async fn subscribe_cockpit(
    host: &str,
    port: u16,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, Instant)>> {
    let mut o = MqttOptions::new(format!("demo-cockpit-{}", std::process::id()), host, port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (cockpit, mut cockpit_loop) = AsyncClient::new(o, 16);
    let results = fhecam::wire::cockpit_filter(fhecam::wire::DEFAULT_COCKPIT_PREFIX);
    cockpit.subscribe(results, QoS::AtLeastOnce).await?;
    let (res_tx, res_rx) = tokio::sync::mpsc::unbounded_channel();
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // the client lives as long as its event loop
        let _cockpit = cockpit;
        let mut sub_tx = Some(sub_tx);
        loop {
            match cockpit_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = sub_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = res_tx.send((p.topic.clone(), p.payload.to_vec(), Instant::now()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), sub_rx)
        .await
        .context("the cockpit could not subscribe to the broker")??;
    Ok(res_rx)
}

/// The results of frames 0..frames by sequence number, waiting up to two minutes.
async fn collect_results(
    results: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, Instant)>,
    frames: usize,
) -> Vec<Received> {
    let mut got: Vec<Received> = (0..frames).map(|_| None).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while got.iter().any(Option::is_none) {
        let Ok(Some((topic, payload, at))) =
            tokio::time::timeout_at(deadline, results.recv()).await
        else {
            break;
        };
        let r: fhecam::wire::CockpitResult = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => {
                println!("[cockpit] {topic}: unreadable result ({e})");
                continue;
            }
        };
        let latency = {
            let now_ms = fhecam::ids::unix_now_ms();
            let elapsed_since = at.elapsed().as_millis() as u64;
            (now_ms.saturating_sub(elapsed_since)).saturating_sub(r.frame_timestamp_ms) as f64
                / 1000.0
        };
        let seq = r.sequence as usize;
        if seq < got.len() && got[seq].is_none() {
            got[seq] = Some((r, latency));
        }
    }
    got
}

/// The table of frames (truth, plaintext, decrypted, latency) and the summary; an error
/// unless every result arrived and equals the plaintext model's label and logits.
fn print_report(
    got: &[Received],
    plain: &[(usize, Vec<i64>)],
    te: &fhecam::data::Dataset,
    edge_s: f64,
) -> Result<()> {
    println!();
    println!("frame  true  plaintext  decrypted (backend)  latency");
    let (mut agree, mut correct, mut lat) = (0, 0, Vec::new());
    for (i, g) in got.iter().enumerate() {
        match g {
            Some((r, l)) => {
                let (label, logits) = &plain[i];
                let same = r.label == *label && r.logits.as_ref() == Some(logits);
                agree += same as usize;
                correct += (r.label == te.labels[i] as usize) as usize;
                lat.push(*l);
                println!(
                    "{i:>5}  {:>4}  {:>9}  {:>19}  {:>6.1} s{}",
                    te.labels[i],
                    label,
                    r.label,
                    l,
                    if same {
                        ""
                    } else {
                        "  MISMATCH (label or logits)"
                    }
                );
            }
            None => println!(
                "{i:>5}  {:>4}  {:>9}  {:>19}",
                te.labels[i], plain[i].0, "missing"
            ),
        }
    }
    let n = got.len();
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    println!();
    println!(
        "summary: {n} frames, {} decrypted by the backend, agreement with the plaintext model (label and logits) {agree}/{n}, accuracy {correct}/{n}; {:.1} s of encrypted inference per frame, mean latency capture -> cockpit {mean:.1} s (frames queue behind each other)",
        lat.len(),
        edge_s / n as f64
    );
    if agree != n {
        bail!("the backend's labels or logits differ from the plaintext model's (or some are missing)");
    }
    Ok(())
}
