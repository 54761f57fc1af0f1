//! `fhecam train`: a built-in model trained on a data set, a quantization-aware CNN or a
//! secret-table network.

use crate::{load_split, save_model};
use anyhow::{bail, Result};
use fhecam::data::Dataset;
use fhecam::{train, train_tables};
use std::path::PathBuf;

/// The model families `fhecam train` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// Quantized CNNs (encrypted weights, --preset).
    Cnn,
    /// Secret-table networks (encrypted lookup tables).
    Tables,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model family: `cnn` (the quantized CNNs, --preset) or `tables` (secret-table
    /// network: every neuron a secret lookup table, issue 23).
    #[arg(long, value_enum, default_value = "cnn")]
    pub family: Family,
    /// Tables family: the largest network whose planned PBS per frame with
    /// device-clear input is at most N (default: the built-in preset).
    #[arg(long)]
    pub budget_pbs: Option<u64>,
    /// Tables family: bits of a class score in the output tables (1..=4).
    #[arg(long)]
    pub score_bits: Option<u8>,
    /// Tables family: learned thresholds per pixel (layer 0).
    #[arg(long)]
    pub thresholds: Option<usize>,
    /// Tables family: tables of layer 1.
    #[arg(long)]
    pub n1: Option<usize>,
    /// Tables family: tables of layer 2.
    #[arg(long)]
    pub n2: Option<usize>,
    /// Tables family: layer-2 bits per output group (2 or 4).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Tables family: layer 1 reads 2x2 pixel patches (`local`) or any bits (`random`).
    #[arg(long, value_enum)]
    pub wiring: Option<train_tables::WiringKind>,
    /// Tables family: probability of flipping each hidden bit in training (0 ≤ p < 0.5).
    #[arg(long)]
    pub flip: Option<f64>,
    /// Data set to train on (only `digits`: scikit-learn's 8x8 handwritten digits).
    #[arg(long, default_value = "digits")]
    pub dataset: String,
    /// Where to write the integer model (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Training epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Random seed (initialisation and batch order).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output channels of the 3x3 convolution.
    #[arg(long)]
    pub channels: Option<usize>,
    /// Convolution stride.
    #[arg(long)]
    pub stride: Option<usize>,
    /// Convolution zero padding.
    #[arg(long)]
    pub padding: Option<usize>,
    /// Max-pool window after the convolution's activation.
    #[arg(long)]
    pub pool: Option<usize>,
    /// Width of an extra hidden dense layer.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Weight bits: 2 gives levels -2..=1, 1 gives ternary -1..=1. Ternary products span 7
    /// values instead of 10 and carry cheaper: the reference preset then plans about
    /// 7,150 PBS with device-clear input instead of 9,822, but is 0.93–0.96 accurate over
    /// seeds 1–8 instead of 0.95–0.97.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub weight_bits: Option<u8>,
    /// Starting point the other flags modify: `reference` (16 channels, ≥ 0.95 accurate,
    /// ~12,900 PBS per frame) or `fast` (4 channels, ~0.93, ~3,200 PBS).
    #[arg(long, value_enum, default_value = "reference")]
    pub preset: train::Preset,

    /// Learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    match a.family {
        Family::Tables => tables(a),
        Family::Cnn => cnn(a),
    }
}

/// `train --family tables`: a secret-table network.
fn tables(a: TrainArgs) -> Result<()> {
    if a.cnn_flags_set() {
        bail!("--channels, --stride, --padding, --pool, --hidden and --weight-bits shape a CNN; the tables family takes --budget-pbs and --score-bits");
    }
    let (tr, te) = load_split(&a.dataset)?;
    let d = match a.budget_pbs {
        Some(b) => train_tables::TablesConfig::for_budget(b, tr.num_classes())?,
        None => train_tables::TablesConfig::default(),
    };
    let cfg = train_tables::TablesConfig {
        seed: a.seed,
        epochs: a.epochs.unwrap_or(d.epochs),
        learning_rate: a.lr.unwrap_or(d.learning_rate),
        score_bits: a.score_bits.unwrap_or(d.score_bits),
        thresholds: a.thresholds.unwrap_or(d.thresholds),
        n1: a.n1.unwrap_or(d.n1),
        n2: a.n2.unwrap_or(d.n2),
        group_size: a.group_size.unwrap_or(d.group_size),
        wiring: a.wiring.unwrap_or(d.wiring),
        flip: a.flip.unwrap_or(d.flip),
        ..d
    };
    let r = with_progress(cfg.epochs, |p| train_tables::train(&cfg, &tr, &te, p))?;
    save_model(&r.model, &a.out, Some(r.scores.accuracy_float))?;
    println!(
        "wrote {}: accuracy float {:.4}, integer {:.4} on {} test images, final loss {:.4}; tables {} thresholds/pixel, {} + {} hidden, {} groups of {}, {}-bit scores; PBS per frame (plan) {} device-clear, {} encrypted; {:.1} s",
        a.out.display(),
        r.scores.accuracy_float,
        r.scores.accuracy_plain,
        r.scores.test_samples,
        r.scores.final_loss,
        cfg.thresholds,
        cfg.n1,
        cfg.n2,
        cfg.n2 / cfg.group_size,
        cfg.group_size,
        cfg.score_bits,
        r.pbs_device_clear,
        r.pbs_encrypted,
        r.scores.train_seconds
    );
    Ok(())
}

/// `train --family cnn`: a quantization-aware CNN from a preset.
fn cnn(a: TrainArgs) -> Result<()> {
    if a.tables_flags_set() {
        bail!("--budget-pbs, --score-bits, --thresholds, --n1, --n2, --group-size, --wiring and --flip shape a secret-table network: add --family tables");
    }
    let (tr, te) = load_split(&a.dataset)?;
    let d = a.preset.config();
    let cfg = train::TrainConfig {
        seed: a.seed,
        epochs: a.epochs.unwrap_or(d.epochs),
        conv_channels: a.channels.unwrap_or(d.conv_channels),
        stride: a.stride.unwrap_or(d.stride),
        padding: a.padding.unwrap_or(d.padding),
        pool: a.pool.or(d.pool),
        hidden: a.hidden.or(d.hidden),
        learning_rate: a.lr.unwrap_or(d.learning_rate),
        weight_levels: match a.weight_bits {
            Some(1) => [-1, 1],
            Some(_) => [-2, 1],
            None => d.weight_levels,
        },
        ..d
    };
    let report = train_with_progress(&cfg, &tr, &te)?;
    save_model(&report.model, &a.out, Some(report.scores.accuracy_float))?;
    println!(
        "wrote {}: accuracy float {:.4}, integer {:.4} on {} test images, {} ct x ct MACs",
        a.out.display(),
        report.scores.accuracy_float,
        report.scores.accuracy_plain,
        report.scores.test_samples,
        report.model.macs()?
    );
    Ok(())
}

impl TrainArgs {
    /// A flag that only shapes a CNN was given.
    fn cnn_flags_set(&self) -> bool {
        self.channels.is_some()
            || self.stride.is_some()
            || self.padding.is_some()
            || self.pool.is_some()
            || self.hidden.is_some()
            || self.weight_bits.is_some()
    }

    /// A flag that only shapes a secret-table network was given.
    fn tables_flags_set(&self) -> bool {
        self.budget_pbs.is_some()
            || self.score_bits.is_some()
            || self.thresholds.is_some()
            || self.n1.is_some()
            || self.n2.is_some()
            || self.group_size.is_some()
            || self.wiring.is_some()
            || self.flip.is_some()
    }
}

pub(crate) fn train_with_progress(
    cfg: &train::TrainConfig,
    tr: &Dataset,
    te: &Dataset,
) -> Result<train::TrainReport> {
    with_progress(cfg.epochs, |p| train::train(cfg, tr, te, p))
}

/// Runs a trainer with a progress bar fed by its per-epoch callback.
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
