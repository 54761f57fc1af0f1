//! `fhecam import` (ONNX → integer model) and `fhecam eval` (accuracy: float, integer, FHE).

use anyhow::{bail, Context, Result};
use clap::Args;
use fhecam::data::Dataset;
use fhecam::fhe::eval;
use fhecam::import::quantize::{
    QuantConfig, DEFAULT_ACT_BITS, DEFAULT_OUTPUT_WEIGHT_BITS, DEFAULT_WEIGHT_BITS,
};
use fhecam::import::{self, accuracy, predict_int, predict_tract};
use fhecam::model::Model;
use fhecam::npy::{self, Array};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct ImportArgs {
    /// ONNX model as `torch.onnx.export` (opset 13–18) or tf2onnx writes it.
    pub onnx: PathBuf,
    /// Calibration samples: a float32 .npy of shape (N, C, H, W), preprocessed exactly as
    /// the model's training inputs (a few hundred representative images are enough).
    #[arg(long, required_unless_present = "dataset")]
    pub calibration: Option<PathBuf>,
    /// Calibrate on a built-in data set instead (`digits`: its training split, intensities
    /// in [0, 1]).
    #[arg(long, conflicts_with = "calibration")]
    pub dataset: Option<String>,
    /// Labels of the calibration samples (one class index per line): reports the accuracy
    /// cost of quantization on them.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Where to write the integer model (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Signed weight bits (2..=8). Each base-4 digit of a weight costs one PBS per
    /// multiply: 2 bits are one digit, 3–4 two, 5–6 three, 7–8 four.
    #[arg(long, default_value_t = DEFAULT_WEIGHT_BITS)]
    pub weight_bits: u8,
    /// Activation bits (1..=4): 1–2 bits are one digit, 3–4 bits two.
    #[arg(long, default_value_t = DEFAULT_ACT_BITS)]
    pub act_bits: u8,
    /// Signed weight bits of the output layer (2..=8): one scale serves all classes there.
    #[arg(long, default_value_t = DEFAULT_OUTPUT_WEIGHT_BITS)]
    pub output_weight_bits: u8,
    /// Input bits (1..=8); defaults to the activation bits.
    #[arg(long)]
    pub input_bits: Option<u8>,
    /// Try the bit widths the engine runs fastest, report each one's accuracy and PBS, and
    /// keep the cheapest that loses at most half a point on the calibration data (instead
    /// of --weight-bits/--act-bits).
    #[arg(long, conflicts_with_all = ["weight_bits", "act_bits"])]
    pub search: bool,
    /// One weight scale per layer instead of one per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    /// Keep each activation's scale where calibration puts it. By default a ReLU's (or a
    /// requantization's) scale moves, by a factor within 0.71..1.41, to a power-of-two
    /// number of accumulator units per level: the encrypted engine then reads the level
    /// from digits of the sum instead of 15 comparisons.
    #[arg(long)]
    pub free_scales: bool,
    /// Use at most this many calibration samples.
    #[arg(long, default_value_t = 1000)]
    pub max_calibration: usize,
    /// Model name recorded in the file (defaults to the ONNX file's stem).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Integer model (JSON) from `fhecam import` or `fhecam train`.
    pub model: PathBuf,
    /// Test samples: a float32 .npy of shape (N, C, H, W).
    #[arg(long, required_unless_present = "dataset", requires = "labels")]
    pub data: Option<PathBuf>,
    /// Labels of the test samples, one class index per line.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Evaluate on a built-in data set instead (`digits`: its test split).
    #[arg(long, conflicts_with = "data")]
    pub dataset: Option<String>,
    /// Also run the float ONNX model (through tract) on the same samples.
    #[arg(long)]
    pub onnx: Option<PathBuf>,
    /// Encrypt this many samples end to end (fresh keys) and compare the decrypted logits
    /// with the plaintext integer model.
    #[arg(long, default_value_t = 0)]
    pub fhe: usize,
    /// FHE worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// How --fhe feeds each sample to the encrypted network.
    #[arg(long, value_enum, default_value_t)]
    pub input_mode: super::InputModeArg,
    /// Print the result as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

fn dataset_array(ds: &Dataset) -> (Array, Vec<usize>) {
    let data = Array {
        shape: vec![ds.len(), ds.channels, ds.height, ds.width],
        data: ds.images.iter().flatten().copied().collect(),
    };
    (data, ds.labels.iter().map(|&l| l as usize).collect())
}

fn read_data(path: &Path, labels: Option<&Path>) -> Result<(Array, Option<Vec<usize>>)> {
    let data = npy::read(path)?;
    let labels = match labels {
        Some(p) => {
            let l = npy::read_labels(p)?;
            if l.len() != data.samples() {
                bail!(
                    "{} has {} labels for {} samples in {}",
                    p.display(),
                    l.len(),
                    data.samples(),
                    path.display()
                );
            }
            Some(l)
        }
        None => None,
    };
    Ok((data, labels))
}

fn take(data: Array, labels: Option<Vec<usize>>, n: usize) -> (Array, Option<Vec<usize>>) {
    if data.samples() <= n {
        return (data, labels);
    }
    let len = data.sample_len();
    let mut shape = data.shape.clone();
    shape[0] = n;
    (
        Array {
            shape,
            data: data.data[..n * len].to_vec(),
        },
        labels.map(|mut l| {
            l.truncate(n);
            l
        }),
    )
}

/// Bit widths `--search` tries: (weight bits, activation bits), one per digit count (3-bit
/// activations: fewer table steps than 4 at the same digit count).
const CANDIDATES: [(u8, u8); 9] = [
    (2, 2),
    (4, 2),
    (4, 3),
    (4, 4),
    (6, 3),
    (6, 4),
    (8, 2),
    (8, 3),
    (8, 4),
];

/// A candidate is good enough when it loses at most this much accuracy on the calibration
/// data (or, without labels, disagrees with the float model on at most this fraction).
const AUTO_TOLERANCE: f64 = 0.005;

struct Candidate {
    cfg: QuantConfig,
    model: Model,
    /// Where the integer model departs from the ONNX model's own quantizers.
    notes: Vec<String>,
    /// Quantizers a power-of-two level spacing would make cheaper, and by how much.
    advice: Vec<String>,
    pbs: u64,
    /// Integer accuracy on the calibration labels, or agreement with the float model.
    score: f64,
}

pub fn import(a: ImportArgs) -> Result<()> {
    let t = Instant::now();
    let parsed = import::read_onnx(&a.onnx)
        .with_context(|| format!("cannot import {}", a.onnx.display()))?;
    let (data, labels) = calibration_data(&a)?;
    let ranges = parsed.calibrate(&data).context("calibration data")?;
    let name = a.name.clone().unwrap_or_else(|| {
        a.onnx
            .file_stem()
            .map_or("imported".into(), |s| s.to_string_lossy().into_owned())
    });
    eprintln!(
        "{}: {} layers, input {:?}; calibrating on {} samples",
        a.onnx.display(),
        parsed.graph.nodes.len(),
        parsed.graph.input,
        data.samples(),
    );
    for n in &parsed.graph.notes {
        eprintln!("note: {n}");
    }
    let float = parsed.predict_float(&data);
    let target = match &labels {
        Some(l) => accuracy(&float, l),
        None => 1.0,
    };
    let score = |pred: &[usize]| match &labels {
        Some(l) => accuracy(pred, l),
        None => accuracy(pred, &float),
    };
    let make = |w: u8, act: u8| -> Result<Candidate> {
        let cfg = QuantConfig {
            weight_bits: w,
            act_bits: act,
            input_bits: a.input_bits.unwrap_or(act),
            per_channel: !a.per_tensor,
            output_weight_bits: a.output_weight_bits.max(w),
            pow2_steps: !a.free_scales,
        };
        cfg.check()?;
        let (model, notes, advice) = parsed.quantize_advised(&ranges, cfg, &name)?;
        let pbs = eval::plan(&model)?.0.iter().sum();
        let score = score(&predict_int(&model, &data)?);
        Ok(Candidate {
            cfg,
            model,
            notes,
            advice,
            pbs,
            score,
        })
    };
    let what = if labels.is_some() {
        "calibration accuracy"
    } else {
        "agreement with float"
    };
    let chosen = match a.search {
        true => search(&make, target, what)?,
        false => make(a.weight_bits, a.act_bits)?,
    };
    let notes = &chosen.notes;
    if parsed.is_quantized() {
        eprintln!(
            "quantized model (QDQ): its quantized weights and quantizers are taken as they are{}",
            if notes.is_empty() {
                ", exactly".to_string()
            } else {
                format!("; {} departure(s):", notes.len())
            }
        );
    }
    for n in notes.iter().chain(&chosen.advice) {
        eprintln!("note: {n}");
    }
    crate::save_model(&chosen.model, &a.out, None)?;
    crate::print_plan(&chosen.model)?;
    report(
        &a,
        &chosen,
        parsed.is_quantized(),
        (&data, labels.as_deref()),
        &float,
        t,
    )
}

/// "2 bits", or "2–3 bits (per layer: 2, 3)" where the layers differ.
fn widths_text(bits: &[u8]) -> String {
    let (lo, hi) = (bits.iter().min(), bits.iter().max());
    match (lo, hi) {
        (Some(l), Some(h)) if l == h => format!("{l} bits"),
        (Some(l), Some(h)) => {
            let each: Vec<String> = bits.iter().map(u8::to_string).collect();
            format!("{l}–{h} bits (per layer: {})", each.join(", "))
        }
        _ => "none".into(),
    }
}

/// The bit widths the integer model uses: its layers' weights (from their integer
/// ranges), its activations and its input.
fn used_widths(model: &Model) -> String {
    use fhecam::advise::signed_bits;
    use fhecam::model::Op;
    let (mut w, mut act) = (vec![], vec![]);
    for n in &model.nodes {
        if let Some(l) = n.op.linear() {
            w.push(signed_bits(l.weight_range));
        } else if let Op::Activation(l) = &n.op {
            act.push(l.bits);
        }
    }
    format!(
        "weights {}, activations {}, input {} bits",
        widths_text(&w),
        widths_text(&act),
        model.input.bits
    )
}

/// The calibration samples (`--calibration` or the training split of `--dataset`), with
/// their labels when known, at most `--max-calibration`.
fn calibration_data(a: &ImportArgs) -> Result<(Array, Option<Vec<usize>>)> {
    let (data, labels) = match (&a.calibration, &a.dataset) {
        (Some(p), _) => read_data(p, a.labels.as_deref())?,
        (None, Some(name)) => {
            let (train, _) = crate::load_split(name)?;
            let (d, l) = dataset_array(&train);
            (d, Some(l))
        }
        (None, None) => bail!("give --calibration X.npy or --dataset digits"),
    };
    Ok(take(data, labels, a.max_calibration))
}

/// `--search`: every candidate bit width; the cheapest within [`AUTO_TOLERANCE`] of
/// `target`, else the most accurate.
fn search(
    make: &dyn Fn(u8, u8) -> Result<Candidate>,
    target: f64,
    what: &str,
) -> Result<Candidate> {
    let mut tried: Vec<Candidate> = Vec::new();
    for (w, act) in CANDIDATES {
        match make(w, act) {
            Ok(c) => {
                eprintln!(
                    "  {w}-bit weights, {act}-bit activations: {what} {:.4}, {} PBS",
                    c.score, c.pbs
                );
                tried.push(c);
            }
            Err(e) => {
                eprintln!("  {w}-bit weights, {act}-bit activations: skipped ({e:#})")
            }
        }
    }
    if tried.is_empty() {
        bail!("no bit width could quantize this model (see above)");
    }
    tried.sort_by_key(|c| c.pbs);
    let pick = tried
        .iter()
        .position(|c| c.score >= target - AUTO_TOLERANCE)
        .unwrap_or_else(|| {
            // none keeps the float accuracy: the most accurate, cheapest on ties
            let best = tried.iter().map(|c| c.score).fold(0.0, f64::max);
            tried.iter().position(|c| c.score == best).unwrap()
        });
    Ok(tried.swap_remove(pick))
}

/// What was written, and what quantizing cost on the calibration samples.
/// `qdq`: the model quantized itself; its own widths are reported, not `cfg`'s.
fn report(
    a: &ImportArgs,
    chosen: &Candidate,
    qdq: bool,
    (data, labels): (&Array, Option<&[usize]>),
    float: &[usize],
    t: Instant,
) -> Result<()> {
    let (model, cfg) = (&chosen.model, &chosen.cfg);
    let int = predict_int(model, data)?;
    let widths = if qdq {
        format!("the model's own widths: {}", used_widths(model))
    } else {
        format!(
            "{} weight bits, {} activation bits, {} input bits, {} weight scales",
            cfg.weight_bits,
            cfg.act_bits,
            cfg.input_bits,
            if cfg.per_channel {
                "per-channel"
            } else {
                "per-layer"
            },
        )
    };
    println!(
        "wrote {} ({} nodes; {widths}; {} PBS per encrypted inference) in {:.1} s",
        a.out.display(),
        model.nodes.len(),
        chosen.pbs,
        t.elapsed().as_secs_f64()
    );
    println!(
        "on the {} calibration samples: integer model agrees with the float model on {:.1}%",
        data.samples(),
        100.0 * accuracy(&int, float)
    );
    if let Some(l) = labels {
        println!(
            "calibration accuracy: float {:.4}, integer {:.4} (cost {:+.2} points); measure on held-out data with `fhecam eval`",
            accuracy(float, l),
            accuracy(&int, l),
            100.0 * (accuracy(&int, l) - accuracy(float, l))
        );
    }
    Ok(())
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let model: Model = crate::load_model(&a.model)?;
    let (data, labels) = match (&a.data, &a.dataset) {
        (Some(p), _) => {
            let (d, l) = read_data(p, a.labels.as_deref())?;
            (d, l.context("--labels is required with --data")?)
        }
        (None, Some(name)) => {
            let (_, test) = crate::load_split(name)?;
            dataset_array(&test)
        }
        (None, None) => bail!("give --data X.npy --labels y.txt, or --dataset digits"),
    };
    let [c, h, w] = [model.input.channels, model.input.height, model.input.width];
    data.check_samples([c, h, w], "the data")
        .map_err(|e| anyhow::anyhow!("{e} (model {})", a.model.display()))?;
    let t = Instant::now();
    let int = predict_int(&model, &data)?;
    let accuracy_plain = accuracy(&int, &labels);
    let (pbs, _) = eval::plan(&model)?;
    let mut out = json!({
        "model": model.name,
        "samples": data.samples(),
        "accuracy_plain": accuracy_plain,
        "pbs_per_inference": pbs.iter().sum::<u64>(),
        "macs_ct_ct": model.macs()?,
    });
    println!(
        "{} samples: integer model accuracy {:.4} ({:.1} s)",
        data.samples(),
        accuracy_plain,
        t.elapsed().as_secs_f64()
    );
    if let Some(onnx) = &a.onnx {
        compare_onnx(onnx, &data, &labels, &int, &mut out)?;
    }
    if a.fhe > 0 {
        check_fhe(&a, &model, &data, &labels, &mut out)?;
    }
    if a.json {
        println!("{out}");
    }
    Ok(())
}

/// The integer model's predictions `int` next to the ONNX model's: fhecam's own float
/// reading of a quantized (QDQ) model, and tract's.
fn compare_onnx(
    onnx: &Path,
    data: &Array,
    labels: &[usize],
    int: &[usize],
    out: &mut serde_json::Value,
) -> Result<()> {
    let accuracy_plain = accuracy(int, labels);
    let t = Instant::now();
    let parsed =
        import::read_onnx(onnx).with_context(|| format!("cannot read {}", onnx.display()))?;
    let nhwc = parsed.graph.input_nhwc;
    if parsed.is_quantized() {
        // a quantized (QDQ) model: fhecam's own reading of its graph, quantizers applied
        // as ONNX defines them, next to tract's
        let own = parsed.predict_float(data);
        let (acc, same) = (accuracy(&own, labels), accuracy(int, &own));
        println!(
            "quantized ONNX model as fhecam reads it (its QuantizeLinear/DequantizeLinear applied in float): accuracy {acc:.4}; integer − ONNX = {:+.2} points; same class on {:.1}%",
            100.0 * (accuracy_plain - acc),
            100.0 * same
        );
        out["accuracy_onnx_fhecam"] = json!(acc);
        out["onnx_fhecam_int_same_class"] = json!(same);
    }
    match predict_tract(onnx, data, nhwc) {
        Ok(float) => {
            let accuracy_float = accuracy(&float, labels);
            let same = accuracy(int, &float);
            println!(
        "float ONNX model (tract) accuracy {:.4}; integer − float = {:+.2} points; same class on {:.1}% ({:.1} s)",
        accuracy_float,
        100.0 * (accuracy_plain - accuracy_float),
        100.0 * same,
        t.elapsed().as_secs_f64()
    );
            out["accuracy_float"] = json!(accuracy_float);
            out["float_int_same_class"] = json!(same);
        }
        Err(e) if parsed.is_quantized() => {
            println!("tract cannot run this quantized model ({e}); the line above is fhecam's own reading");
            out["tract_error"] = json!(e.to_string());
        }
        Err(e) => return Err(e).with_context(|| format!("running {} with tract", onnx.display())),
    }
    Ok(())
}

/// `--fhe N`: the first N samples encrypted end to end with fresh keys, checked against
/// the plaintext integer model.
fn check_fhe(
    a: &EvalArgs,
    model: &Model,
    data: &Array,
    labels: &[usize],
    out: &mut serde_json::Value,
) -> Result<()> {
    let [c, h, w] = [model.input.channels, model.input.height, model.input.width];
    let n = a.fhe.min(data.samples());
    let ds = Dataset {
        images: (0..n).map(|i| data.sample(i).to_vec()).collect(),
        labels: labels[..n]
            .iter()
            .map(|&l| u8::try_from(l).context("class index over 255"))
            .collect::<Result<_>>()?,
        channels: c,
        height: h,
        width: w,
    };
    eprintln!("encrypting {n} samples end to end (fresh keys)...");
    let r = crate::bench::run(model, &ds, n, a.threads, None, a.json, a.input_mode.into())?;
    println!(
        "FHE: {n} samples, decrypted = plaintext integer model on {:.0}%, {} PBS each, median {:.1} s per inference",
        100.0 * r.agreement,
        r.pbs_per_inference,
        r.latency_s_median
    );
    out["agreement"] = json!(r.agreement);
    out["fhe_samples"] = json!(n);
    out["fhe_latency_s_median"] = json!(r.latency_s_median);
    out["pbs_counted_by_tfhe"] = json!(r.pbs_counted_by_tfhe);
    Ok(())
}
