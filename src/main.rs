//! The `fhecam` binary: a thin layer of subcommands over the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
#[cfg(feature = "owner-tools")]
use fhecam::data::{self, Dataset};
use fhecam::fhe::eval;
use fhecam::model::Model;
#[cfg(feature = "owner-tools")]
use fhecam::{train, train_tables};
use std::path::{Path, PathBuf};

#[cfg(feature = "owner-tools")]
mod bench;
mod cli;

/// Seed and split used everywhere the digits data set is split (75/25, stratified).
#[cfg(feature = "owner-tools")]
const SPLIT_SEED: u64 = 42;
#[cfg(feature = "owner-tools")]
const TEST_FRACTION: f64 = 0.25;
/// Largest model JSON accepted (an 8x8 CNN is a few kB; big imported models a few MB).
const MODEL_FILE_LIMIT: u64 = 64 << 20;

#[derive(Parser)]
#[command(
    name = "fhecam",
    version,
    about = "Encrypted-model CNN inference for city cameras (TFHE: every weight is a ciphertext)",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[cfg(feature = "owner-tools")]
    /// Train a built-in model on a data set: a quantization-aware CNN (`--family cnn`, the
    /// default) or a secret-table network (`--family tables`).
    Train {
        /// Model family: `cnn` (the quantized CNNs, --preset) or `tables` (secret-table
        /// network: every neuron a secret lookup table, issue 23).
        #[arg(long, value_enum, default_value = "cnn")]
        family: Family,
        /// Tables family: the largest network whose planned PBS per frame with
        /// device-clear input is at most N (default: the built-in preset).
        #[arg(long)]
        budget_pbs: Option<u64>,
        /// Tables family: bits of a class score in the output tables (1..=4).
        #[arg(long)]
        score_bits: Option<u8>,
        /// Tables family: learned thresholds per pixel (layer 0).
        #[arg(long)]
        thresholds: Option<usize>,
        /// Tables family: tables of layer 1.
        #[arg(long)]
        n1: Option<usize>,
        /// Tables family: tables of layer 2.
        #[arg(long)]
        n2: Option<usize>,
        /// Tables family: layer-2 bits per output group (2 or 4).
        #[arg(long)]
        group_size: Option<usize>,
        /// Tables family: layer 1 reads 2x2 pixel patches (`local`) or any bits (`random`).
        #[arg(long, value_enum)]
        wiring: Option<train_tables::WiringKind>,
        /// Tables family: probability of flipping each hidden bit in training (0 ≤ p < 0.5).
        #[arg(long)]
        flip: Option<f64>,
        /// Data set to train on (only `digits`: scikit-learn's 8x8 handwritten digits).
        #[arg(long, default_value = "digits")]
        dataset: String,
        /// Where to write the integer model (JSON).
        #[arg(long)]
        out: PathBuf,
        /// Training epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// Random seed (initialisation and batch order).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output channels of the 3x3 convolution.
        #[arg(long)]
        channels: Option<usize>,
        /// Convolution stride.
        #[arg(long)]
        stride: Option<usize>,
        /// Convolution zero padding.
        #[arg(long)]
        padding: Option<usize>,
        /// Max-pool window after the convolution's activation.
        #[arg(long)]
        pool: Option<usize>,
        /// Width of an extra hidden dense layer.
        #[arg(long)]
        hidden: Option<usize>,
        /// Weight bits: 2 gives levels -2..=1, 1 gives ternary -1..=1. Ternary products span 7
        /// values instead of 10 and carry cheaper: the reference preset then plans about
        /// 7,150 PBS with device-clear input instead of 9,822, but is 0.93–0.96 accurate over
        /// seeds 1–8 instead of 0.95–0.97.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        weight_bits: Option<u8>,
        /// Starting point the other flags modify: `reference` (16 channels, ≥ 0.95 accurate,
        /// ~12,900 PBS per frame) or `fast` (4 channels, ~0.93, ~3,200 PBS).
        #[arg(long, value_enum, default_value = "reference")]
        preset: train::Preset,

        /// Learning rate.
        #[arg(long)]
        lr: Option<f64>,
    },
    #[cfg(feature = "owner-tools")]
    /// Import an ONNX model (PyTorch, Keras) and quantize it with calibration data.
    Import(cli::import::ImportArgs),
    #[cfg(feature = "owner-tools")]
    /// Accuracy of an integer model on test data: plaintext, float ONNX (tract), encrypted.
    Eval(cli::import::EvalArgs),
    /// Show the PBS plan of a model: per layer, before any key exists.
    Plan {
        /// Integer model (JSON).
        model: PathBuf,
        /// Plan for this input mode.
        #[arg(long, value_enum, default_value_t)]
        input_mode: cli::InputModeArg,
    },
    #[cfg(feature = "owner-tools")]
    /// Encrypted inference benchmark on test images, checked against the plaintext model.
    Bench {
        /// Integer model (JSON); or use --reference.
        #[arg(long, conflicts_with = "reference")]
        model: Option<PathBuf>,
        /// Train (or reuse a cached) built-in model for this data set (`digits`).
        #[arg(long)]
        reference: Option<String>,
        /// Which built-in model --reference trains.
        #[arg(long, value_enum, default_value = "reference")]
        preset: train::Preset,
        /// Test images to run encrypted.
        #[arg(long, default_value_t = 5)]
        samples: usize,
        /// FHE worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print the report as JSON (its last line is one JSON object).
        #[arg(long)]
        json: bool,
        /// How each test image enters the encrypted network.
        #[arg(long, value_enum, default_value_t)]
        input_mode: cli::InputModeArg,
        /// Instead of a model: measure the output noise of N secret-table PBS against N
        /// clear-table PBS (fresh keys, random tables and inputs; docs/DESIGN.md).
        #[arg(long, value_name = "N", conflicts_with_all = ["model", "reference"])]
        table_noise: Option<usize>,
    },
    #[command(flatten)]
    Owner(cli::owner::OwnerCmd),
    #[command(flatten)]
    Edge(cli::edge::EdgeCmd),
    /// The backend decryption agent: subscribes to the cameras' encrypted inferences (MQTT
    /// v5 shared subscription), validates and decrypts them with the owner database, and
    /// publishes labels for the city cockpit; refusals go to a dead-letter topic.
    Agent(cli::agent::AgentArgs),
    /// The live fleet page for a city operator: every camera's state, model, last label,
    /// latency and refusals, updated as results arrive (`/api/cameras` for programs).
    #[cfg(feature = "cockpit")]
    Cockpit(cli::cockpit::CockpitArgs),
    /// The cameras on a broker, from their retained reports: availability, the model
    /// name and version each runs, frames, inferences, drops, outbox depth, and how long
    /// ago the last inference finished.
    Fleet(cli::fleet::FleetArgs),
    #[cfg(feature = "owner-tools")]
    /// The whole product on this machine: the owner protects and deploys the digits model, a
    /// broker starts, the edge daemon plays real test digits through GStreamer and publishes
    /// encrypted inferences, the backend agent decrypts them; each label is printed next to
    /// the true label and the plaintext model's.
    Demo {
        /// Test digits played as camera frames.
        #[arg(long, default_value_t = 3)]
        frames: usize,
        /// FHE worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Built-in model: `tables` (secret lookup tables, 0.9645, about 20 s per frame on
        /// 2 cores), `fast` (CNN, 4 channels, ~0.93, about 30 s per frame) or `reference`
        /// (CNN, 16 channels, ≥ 0.95, about 3–4 minutes per frame).
        #[arg(long, value_enum, default_value = "tables")]
        preset: cli::demo::DemoModel,
        /// Use this MQTT broker (HOST:PORT) instead of starting mosquitto on a free port.
        #[arg(long)]
        broker: Option<String>,
        /// Keep the work directory (database, keys, bundle, frames) here, and stay up after
        /// the frames (broker, agent and cockpit page) until Ctrl-C.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Prove this device works: one frame through the GStreamer source and OpenCV, a tiny
    /// network encrypted with a throwaway key and run on it encrypted, the decrypted logits
    /// checked bit for bit against the plaintext reference. Exits non-zero on any failure.
    Selftest(cli::selftest::SelftestArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            // tract announces its SIMD kernels at info level on every model load
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tract_linalg=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, joined by ": ", leaving out a cause the message before it
/// already ends with (many error types print their source in their own message too).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.ends_with(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        #[cfg(feature = "owner-tools")]
        Cmd::Train {
            family: Family::Tables,
            budget_pbs,
            score_bits,
            thresholds,
            n1,
            n2,
            group_size,
            wiring,
            flip,
            dataset,
            out,
            epochs,
            seed,
            lr,
            channels,
            stride,
            padding,
            pool,
            hidden,
            weight_bits,
            ..
        } => {
            if channels.is_some()
                || stride.is_some()
                || padding.is_some()
                || pool.is_some()
                || hidden.is_some()
                || weight_bits.is_some()
            {
                bail!("--channels, --stride, --padding, --pool, --hidden and --weight-bits shape a CNN; the tables family takes --budget-pbs and --score-bits");
            }
            let (tr, te) = load_split(&dataset)?;
            let d = match budget_pbs {
                Some(b) => train_tables::TablesConfig::for_budget(b, tr.num_classes())?,
                None => train_tables::TablesConfig::default(),
            };
            let cfg = train_tables::TablesConfig {
                seed,
                epochs: epochs.unwrap_or(d.epochs),
                learning_rate: lr.unwrap_or(d.learning_rate),
                score_bits: score_bits.unwrap_or(d.score_bits),
                thresholds: thresholds.unwrap_or(d.thresholds),
                n1: n1.unwrap_or(d.n1),
                n2: n2.unwrap_or(d.n2),
                group_size: group_size.unwrap_or(d.group_size),
                wiring: wiring.unwrap_or(d.wiring),
                flip: flip.unwrap_or(d.flip),
                ..d
            };
            let r = with_progress(cfg.epochs, |p| train_tables::train(&cfg, &tr, &te, p))?;
            save_model(&r.model, &out, Some(r.accuracy_float))?;
            println!(
                "wrote {}: accuracy float {:.4}, integer {:.4} on {} test images, final loss {:.4}; tables {} thresholds/pixel, {} + {} hidden, {} groups of {}, {}-bit scores; PBS per frame (plan) {} device-clear, {} encrypted; {:.1} s",
                out.display(),
                r.accuracy_float,
                r.accuracy_plain,
                r.test_samples,
                r.final_loss,
                cfg.thresholds,
                cfg.n1,
                cfg.n2,
                cfg.n2 / cfg.group_size,
                cfg.group_size,
                cfg.score_bits,
                r.pbs_device_clear,
                r.pbs_encrypted,
                r.train_seconds
            );
        }
        #[cfg(feature = "owner-tools")]
        Cmd::Train {
            family: Family::Cnn,
            budget_pbs,
            score_bits,
            thresholds,
            n1,
            n2,
            group_size,
            wiring,
            flip,
            dataset,
            out,
            epochs,
            seed,
            channels,
            stride,
            padding,
            pool,
            hidden,
            lr,
            weight_bits,
            preset,
        } => {
            if budget_pbs.is_some()
                || score_bits.is_some()
                || thresholds.is_some()
                || n1.is_some()
                || n2.is_some()
                || group_size.is_some()
                || wiring.is_some()
                || flip.is_some()
            {
                bail!("--budget-pbs, --score-bits, --thresholds, --n1, --n2, --group-size, --wiring and --flip shape a secret-table network: add --family tables");
            }
            let (tr, te) = load_split(&dataset)?;
            let d = preset.config();
            let cfg = train::TrainConfig {
                seed,
                epochs: epochs.unwrap_or(d.epochs),
                conv_channels: channels.unwrap_or(d.conv_channels),
                stride: stride.unwrap_or(d.stride),
                padding: padding.unwrap_or(d.padding),
                pool: pool.or(d.pool),
                hidden: hidden.or(d.hidden),
                learning_rate: lr.unwrap_or(d.learning_rate),
                weight_levels: match weight_bits {
                    Some(1) => [-1, 1],
                    Some(_) => [-2, 1],
                    None => d.weight_levels,
                },
                ..d
            };
            let report = train_with_progress(&cfg, &tr, &te)?;
            save_model(&report.model, &out, Some(report.accuracy_float))?;
            println!(
                "wrote {}: accuracy float {:.4}, integer {:.4} on {} test images, {} ct x ct MACs",
                out.display(),
                report.accuracy_float,
                report.accuracy_plain,
                report.test_samples,
                report.model.macs()?
            );
        }
        #[cfg(feature = "owner-tools")]
        Cmd::Import(args) => cli::import::import(args)?,
        #[cfg(feature = "owner-tools")]
        Cmd::Eval(args) => cli::import::eval_cmd(args)?,
        Cmd::Plan { model, input_mode } => {
            let m = load_model(&model)?;
            print_plan_mode(&m, input_mode.into())?;
        }
        #[cfg(feature = "owner-tools")]
        Cmd::Bench {
            model,
            reference,
            preset,
            samples,
            threads,
            json,
            input_mode,
            table_noise,
        } => {
            if let Some(n) = table_noise {
                return table_noise_report(n.clamp(2, 1 << 20), json);
            }
            let (m, acc_float) = match (model, reference) {
                (Some(p), _) => (load_model(&p)?, read_float_accuracy(&p)),
                (None, Some(ds)) => reference_model(&ds, preset)?,
                (None, None) => bail!("give --model MODEL or --reference digits"),
            };
            let (_, te) = load_split("digits")?;
            if te.images[0].len() != m.input.len() {
                bail!(
                    "model input is {}x{}x{} but the digits images are 1x8x8",
                    m.input.channels,
                    m.input.height,
                    m.input.width
                );
            }
            let r = bench::run(
                &m,
                &te,
                samples,
                threads,
                acc_float,
                json,
                input_mode.into(),
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_bench(&r);
            }
        }
        #[cfg(feature = "owner-tools")]
        Cmd::Demo {
            frames,
            threads,
            preset,
            broker,
            keep,
        } => {
            let model = preset.model()?;
            let (_, te) = load_split("digits")?;
            cli::demo::run(
                cli::demo::DemoArgs {
                    frames,
                    threads,
                    preset,
                    broker,
                    keep,
                },
                model,
                te,
            )?
        }
        Cmd::Selftest(args) => cli::selftest::run(args)?,
        Cmd::Agent(args) => cli::agent::run(args)?,
        #[cfg(feature = "cockpit")]
        Cmd::Cockpit(args) => cli::cockpit::run(args)?,
        Cmd::Fleet(args) => cli::fleet::run(args)?,
        Cmd::Owner(cmd) => cli::owner::run(cmd)?,
        Cmd::Edge(cmd) => cli::edge::run(cmd)?,
    }
    Ok(())
}

#[cfg(feature = "owner-tools")]
pub(crate) fn load_split(name: &str) -> Result<(Dataset, Dataset)> {
    if name != "digits" {
        bail!("unknown data set {name:?}: the built-in one is `digits`");
    }
    let ds = data::load_digits()?;
    Ok(data::stratified_split(&ds, TEST_FRACTION, SPLIT_SEED))
}

#[cfg(feature = "owner-tools")]
fn train_with_progress(
    cfg: &train::TrainConfig,
    tr: &Dataset,
    te: &Dataset,
) -> Result<train::TrainReport> {
    with_progress(cfg.epochs, |p| train::train(cfg, tr, te, p))
}

/// Runs a trainer with a progress bar fed by its per-epoch callback.
#[cfg(feature = "owner-tools")]
pub(crate) fn with_progress<T>(
    epochs: usize,
    f: impl FnOnce(&dyn Fn(usize, f32)) -> Result<T, train::TrainError>,
) -> Result<T> {
    let pb = indicatif::ProgressBar::new(epochs as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("training {bar:30} epoch {pos}/{len} {msg}")
            .unwrap(),
    );
    let report = f(&|epoch, loss| {
        pb.set_position(epoch as u64 + 1);
        pb.set_message(format!("loss {loss:.4}"));
    })?;
    pb.finish_and_clear();
    Ok(report)
}

/// The model families `fhecam train` builds.
#[cfg(feature = "owner-tools")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Family {
    /// Quantized CNNs (encrypted weights, --preset).
    Cnn,
    /// Secret-table networks (encrypted lookup tables).
    Tables,
}

pub(crate) fn load_model(path: &Path) -> Result<Model> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read model {}", path.display()))?;
    if meta.len() > MODEL_FILE_LIMIT {
        bail!(
            "model {} is {} bytes, over the {MODEL_FILE_LIMIT}-byte limit",
            path.display(),
            meta.len()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read model {}", path.display()))?;
    let m: Model = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an fhecam model (JSON)", path.display()))?;
    m.infer()
        .with_context(|| format!("model {} is invalid", path.display()))?;
    Ok(m)
}

#[cfg(feature = "owner-tools")]
fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".train.json");
    PathBuf::from(s)
}

#[cfg(feature = "owner-tools")]
pub(crate) fn save_model(m: &Model, path: &Path, accuracy_float: Option<f64>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string(m)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(a) = accuracy_float {
        std::fs::write(
            sidecar(path),
            serde_json::json!({ "accuracy_float": a }).to_string(),
        )?;
    }
    Ok(())
}

#[cfg(feature = "owner-tools")]
fn read_float_accuracy(path: &Path) -> Option<f64> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sidecar(path)).ok()?).ok()?;
    v.get("accuracy_float")?.as_f64()
}

#[cfg(feature = "owner-tools")]
/// The cached reference model, trained on first use.
pub(crate) fn reference_model(ds: &str, preset: train::Preset) -> Result<(Model, Option<f64>)> {
    if ds != "digits" {
        bail!("no reference model for {ds:?}: the built-in one is `digits`");
    }
    // the file name changes whenever the preset's recipe does, so no stale model is reused
    let cfg = preset.config();
    let path = cache_dir().join("models").join(format!(
        "digits-{}-{}ch-w{}-e{}-s{}.json",
        preset.name(),
        cfg.conv_channels,
        cfg.weight_levels[0],
        cfg.epochs,
        cfg.seed
    ));
    if path.exists() {
        if let Ok(m) = load_model(&path) {
            return Ok((m, read_float_accuracy(&path)));
        }
    }
    eprintln!(
        "training the reference digits model (cached in {})",
        path.display()
    );
    let (tr, te) = load_split(ds)?;
    let report = train_with_progress(&cfg, &tr, &te)?;
    save_model(&report.model, &path, Some(report.accuracy_float))?;
    Ok((report.model, Some(report.accuracy_float)))
}

#[cfg(feature = "owner-tools")]
/// `bench --table-noise N`: secret-table PBS output noise against clear tables.
fn table_noise_report(n: usize, json: bool) -> Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(format!("{n} secret-table and {n} clear-table PBS"));
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let keys = fhecam::fhe::OwnerKeys::generate();
    // on rayon's global pool: one worker per core
    let r = fhecam::fhe::tables::measure_noise(&keys.client, n)?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} evaluations each: output noise std 2^{:.2} (secret table) vs 2^{:.2} (clear table), variance ratio {:.3}, {} wrong",
            r.evaluations, r.std_log2_secret, r.std_log2_clear, r.variance_ratio, r.wrong
        );
    }
    Ok(())
}

#[cfg(feature = "owner-tools")]
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("FHECAM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache"))
}

#[cfg(feature = "owner-tools")]
pub(crate) fn print_plan(m: &Model) -> Result<()> {
    print_plan_mode(m, eval::InputMode::Encrypted)
}

fn print_plan_mode(m: &Model, mode: eval::InputMode) -> Result<()> {
    let (pbs, layout) = eval::plan_mode(m, mode)?;
    let infos = m.infer()?;
    println!("{:<4} {:<12} {:>14} {:>10}", "node", "op", "output", "PBS");
    for (k, (n, p)) in m.nodes.iter().zip(&pbs).enumerate() {
        let s = infos[k + 1].shape;
        println!(
            "{:<4} {:<12} {:>14} {:>10}",
            k,
            n.op.name(),
            format!("{}x{}x{}", s[0], s[1], s[2]),
            p
        );
    }
    println!(
        "{:<4} {:<12} {:>14} {:>10}",
        "",
        "output",
        format!("{} digits", layout.ciphertexts()),
        pbs.last().unwrap()
    );
    let total: u64 = pbs.iter().sum();
    let macs = m.macs()?;
    // secret-table networks multiply nothing encrypted: their cost is per table
    let per_mac = match macs {
        0 => "no encrypted multiply-accumulates".to_string(),
        _ => format!(
            "{macs} multiply-accumulates ({:.2} PBS per MAC all-in)",
            total as f64 / macs as f64
        ),
    };
    println!(
        "total {total} PBS for {per_mac}, {} input; output {} digits packed for the owner, who takes the argmax",
        mode.name(),
        layout.ciphertexts()
    );
    Ok(())
}

#[cfg(feature = "owner-tools")]
fn print_bench(r: &bench::BenchReport) {
    println!("model               {}", r.model);
    println!("parameters          {} ({} threads)", r.params, r.threads);
    println!(
        "PBS / inference     {} (planned {}), {} ct x ct MACs{}, {} input",
        r.pbs_per_inference,
        r.pbs_planned,
        r.macs_ct_ct,
        r.pbs_per_mac
            .map(|p| format!(", {p:.2} PBS per MAC"))
            .unwrap_or_default(),
        r.input_mode
    );
    println!("one PBS (1 thread)  {:.1} ms median", r.pbs_ms_median);
    println!(
        "latency             {:.2} s median ({:.2}..{:.2}) over {} images",
        r.latency_s_median, r.latency_s_min, r.latency_s_max, r.samples
    );
    println!(
        "PBS bound           {:.2} s -> efficiency {:.2}",
        r.pbs_bound_s, r.efficiency
    );
    println!(
        "agreement           {:.3} (decrypted FHE logits == plaintext integer logits)",
        r.agreement
    );
    println!(
        "accuracy            integer {:.4}, float {}",
        r.accuracy_plain,
        r.accuracy_float
            .map(|a| format!("{a:.4}"))
            .unwrap_or_else(|| "n/a".into())
    );
    println!(
        "output              {} PBS to carry the logits; packed in {:.0} ms; {} B published per inference (envelope included)",
        r.output_stage_pbs, r.pack_ms_median, r.output_payload_bytes
    );
    println!(
        "sizes               input {} B, output {} B, encrypted model {} B, evaluation key {} B compressed (compression key {} B), server key {} B in memory",
        r.input_ciphertext_bytes,
        r.output_ciphertext_bytes,
        r.encrypted_model_bytes,
        r.server_key_bytes,
        r.compression_key_bytes,
        r.server_key_uncompressed_bytes
    );
    println!("peak RSS            {:.0} MB", r.peak_rss_mb);
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn a_cause_already_in_the_message_is_not_printed_twice() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        // an error type that prints its source itself, as thiserror messages here do
        #[derive(Debug, thiserror::Error)]
        #[error("key.file: {source}")]
        struct Io {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Io { source: io }).context("deploy");
        assert_eq!(error_chain(&e), "deploy: key.file: no such file");
    }
}
