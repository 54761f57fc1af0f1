//! The `fhecam` binary: a thin layer of subcommands over the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
#[cfg(feature = "owner-tools")]
use fhecam::data::{self, Dataset};
use fhecam::fhe::eval;
use fhecam::model::Model;
#[cfg(feature = "owner-tools")]
use fhecam::train;
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
    Train(cli::train::TrainArgs),
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
        /// Per layer, PBS per MAC or per activation, and why the costly layers cost what
        /// they do, with the saving of a change planned on the changed model.
        #[arg(long)]
        advise: bool,
        /// With --advise: one line of JSON for tools instead of text.
        #[arg(long, requires = "advise")]
        json: bool,
    },
    #[cfg(feature = "owner-tools")]
    /// Encrypted inference benchmark on test images, checked against the plaintext model.
    Bench(cli::bench::BenchArgs),
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
        Cmd::Train(args) => cli::train::run(args)?,
        #[cfg(feature = "owner-tools")]
        Cmd::Import(args) => cli::import::import(args)?,
        #[cfg(feature = "owner-tools")]
        Cmd::Eval(args) => cli::import::eval_cmd(args)?,
        Cmd::Plan {
            model,
            input_mode,
            advise,
            json,
        } => {
            let m = load_model(&model)?;
            match (advise, json) {
                (false, _) => print_plan_mode(&m, input_mode.into())?,
                (true, false) => print_advice(&m, input_mode.into())?,
                (true, true) => println!(
                    "{}",
                    serde_json::to_string(&fhecam::advise::advise(&m, input_mode.into())?)?
                ),
            }
        }
        #[cfg(feature = "owner-tools")]
        Cmd::Bench(args) => cli::bench::run(args)?,
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
pub(crate) fn read_float_accuracy(path: &Path) -> Option<f64> {
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
    let report = cli::train::train_with_progress(&cfg, &tr, &te)?;
    save_model(&report.model, &path, Some(report.scores.accuracy_float))?;
    Ok((report.model, Some(report.scores.accuracy_float)))
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

/// `plan --advise`: per layer, PBS, PBS per MAC or per activation, and the reasons.
fn print_advice(m: &Model, mode: eval::InputMode) -> Result<()> {
    let a = fhecam::advise::advise(m, mode)?;
    println!(
        "{:<4} {:<12} {:>14} {:>10} {:>7} {:>8} {:>13}  what",
        "node", "op", "output", "PBS", "share", "MACs", "PBS per unit"
    );
    for l in &a.layers {
        let s = l.shape;
        let (macs, per, what) = match (&l.linear, &l.activation) {
            (Some(f), _) => (
                f.macs.to_string(),
                format!("{:.2}/MAC", f.pbs_per_mac),
                format!(
                    "{}s{}",
                    f.operands(" x ", ","),
                    if f.reads_clear_frame {
                        " (clear frame: products free)"
                    } else {
                        ""
                    }
                ),
            ),
            (None, Some(f)) => (
                String::new(),
                format!("{:.1}/act", f.pbs_per_activation),
                format!(
                    "{} activations, {}-bit, {} table(s) on a {}-digit accumulator{}",
                    f.activations,
                    f.bits,
                    f.tables.len(),
                    f.accumulator_digits,
                    spacing_note(f)
                ),
            ),
            _ => (String::new(), String::new(), String::new()),
        };
        println!(
            "{:<4} {:<12} {:>14} {:>10} {:>6.1}% {:>8} {:>13}  {}",
            l.node,
            l.op,
            format!("{}x{}x{}", s[0], s[1], s[2]),
            l.pbs,
            100.0 * l.share,
            macs,
            per,
            what
        );
    }
    println!(
        "{:<4} {:<12} {:>14} {:>10} {:>6.1}%",
        "",
        "output",
        "",
        a.output_pbs,
        100.0 * a.output_pbs as f64 / a.total_pbs.max(1) as f64
    );
    println!(
        "total {} PBS for {} multiply-accumulates, {} input",
        a.total_pbs, a.macs, a.input_mode
    );
    let reasons: Vec<_> = a
        .layers
        .iter()
        .flat_map(|l| l.reasons.iter().map(move |r| (l, r)))
        .collect();
    if reasons.is_empty() {
        println!("no change of weights or quantizer steps this advice knows saves 5 % or more of the model's PBS");
    }
    for (l, r) in reasons {
        println!("node {} ({}): {}", l.node, l.op, r.text);
    }
    Ok(())
}

/// The tables' level spacing, for the advice's table.
fn spacing_note(f: &fhecam::advise::ActivationFigures) -> String {
    let s: Vec<f64> = f.tables.iter().filter_map(|t| t.spacing).collect();
    if s.len() != f.tables.len() || s.is_empty() {
        return String::new();
    }
    let lo = s.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if hi - lo < 0.5 {
        format!(", levels {lo:.1} units apart")
    } else {
        format!(", levels {lo:.1}-{hi:.1} units apart")
    }
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
