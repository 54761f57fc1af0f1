//! Quantization-aware training of a small CNN with candle, exported to the integer `Model`.
//!
//! The float forward pass ("fake quantization") computes exactly what the integer model
//! computes, times known positive scales, so the exported model classifies like it:
//! - input: `x_int = clamp(round(p / s_in), 0, 2^bits - 1)` (`InputSpec::quantize`);
//! - weights: ternary `w_t = clamp(round(w / α), -1, 1)`, α = 1.4·mean|w| per output channel
//!   (TWN: threshold 0.7·mean|w|), one α for the whole classifier so its argmax is the
//!   integer argmax;
//! - a linear layer on `x_int` (scale s_in) gives `z = α·s_in·(Σ w_t·x_int + b_int)` with
//!   `b_int = round(b / (α·s_in))`;
//! - activation: `y_int = clamp(round(z / s_out), 0, 2^act_bits - 1)` with a learned s_out
//!   (LSQ-style), which is the lookup table of the integer model's `Activation` node.
//!
//! Gradients pass rounding through straight-through estimators (`v + (q(v) - v).detach()`),
//! and candle's autograd does the rest.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::data::Dataset;
use fhecam_engine::model::{
    ActTable, Activation, Conv2d, Dense, Flatten, InputSpec, Kind, MaxPool, Model, ModelError,
    Node, Op, MAX_ACT_BITS, MODEL_FORMAT_VERSION,
};
use fhecam_engine::reference;

/// TWN: weights with |w| below 0.7·mean|w| become 0, i.e. round(w/α) with α = 1.4·mean|w|.
const TWN_ALPHA: f64 = 1.4;

#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub conv_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    /// Max-pool window (= stride) after the conv activation; None = no pooling.
    pub pool: Option<usize>,
    /// Optional extra dense layer + activation before the classifier.
    pub hidden: Option<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub seed: u64,
    pub input_bits: u8,
    pub act_bits: u8,
    /// Weight levels `[lo, hi]`: `[-1, 1]` is ternary, `[-2, 1]` two-bit. The engine's product
    /// PBS takes any span of at most 3, so both cost the same per MAC.
    pub weight_levels: [i8; 2],
}

/// The built-in digits CNNs: one 3x3 stride-2 convolution, 2-bit ReLU, dense to 10.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 16 channels: 0.956 test accuracy (0.949–0.971 over seeds), ~12,900 PBS per frame (9,822 with device-clear input).
    Reference,
    /// 4 channels: 0.93 (0.92–0.93 over seeds), ~3,200 PBS per frame (2,414 device-clear): demos and tests.
    Fast,
}

impl Preset {
    pub fn config(self) -> TrainConfig {
        match self {
            Preset::Reference => TrainConfig {
                conv_channels: 16,
                ..TrainConfig::default()
            },
            Preset::Fast => TrainConfig::default(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Reference => "reference",
            Preset::Fast => "fast",
        }
    }
}

impl Default for TrainConfig {
    /// The fast preset's architecture.
    fn default() -> Self {
        TrainConfig {
            conv_channels: 4,
            kernel: 3,
            stride: 2,
            padding: 1,
            pool: None,
            hidden: None,
            epochs: 60,
            batch_size: 32,
            learning_rate: 0.03,
            seed: 42,
            input_bits: 2,
            act_bits: 2,
            weight_levels: [-2, 1],
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainReport {
    pub model: Model,
    pub train_samples: usize,
    pub scores: Scores,
}

/// How a trained model does on the test split: the same measures for every trainer.
#[derive(Clone, Debug)]
pub struct Scores {
    /// Accuracy of the (quantized) float forward pass.
    pub accuracy_float: f64,
    /// Accuracy of the exported integer model (`reference::evaluate`).
    pub accuracy_plain: f64,
    pub test_samples: usize,
    /// Per test sample: class chosen by the float forward pass (ties to the lowest index).
    pub predictions_float: Vec<usize>,
    /// Per test sample: class chosen by the integer model (`reference::argmax`).
    pub predictions_plain: Vec<usize>,
    /// Mean training loss of the last epoch.
    pub final_loss: f32,
    pub train_seconds: f64,
}

impl Scores {
    /// Scores `model` on `test` beside the float pass's `predictions_float`; training
    /// began at `started`.
    pub(crate) fn measure(
        model: &Model,
        test: &Dataset,
        predictions_float: Vec<usize>,
        final_loss: f32,
        started: Instant,
    ) -> Result<Scores, TrainError> {
        let predictions_plain = plain_predictions(model, test)?;
        Ok(Scores {
            accuracy_float: accuracy(&predictions_float, test),
            accuracy_plain: accuracy(&predictions_plain, test),
            test_samples: test.len(),
            predictions_float,
            predictions_plain,
            final_loss,
            train_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("invalid data: {0}")]
    Data(String),
    #[error("{context}: {source}")]
    Candle {
        context: &'static str,
        source: candle_core::Error,
    },
    #[error("exported model is invalid: {0}")]
    Model(#[from] ModelError),
    #[error("export: {0}")]
    Export(String),
}

pub(crate) trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, TrainError>;
}

impl<T> Ctx<T> for candle_core::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T, TrainError> {
        self.map_err(|source| TrainError::Candle { context, source })
    }
}

/// Forward-pass flavour: training uses straight-through estimators; evaluation uses the
/// exact integers; calibration is evaluation that also sets each activation scale from the
/// values it sees (before training, so the first steps start from sensible ranges).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Train,
    Eval,
    Calibrate,
}

#[derive(Clone, Copy, Debug)]
enum LayerKind {
    Conv {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    Dense,
}

/// A ternary linear layer; `per_channel` selects one α per output channel or one for all.
struct QLayer {
    w: Var,
    b: Var,
    kind: LayerKind,
    per_channel: bool,
    levels: [i8; 2],
}

/// Quantized parameters of a layer, as tensors (shared by the forward pass and the export so
/// both use bit-identical values).
struct QParams {
    /// Ternary weights, same shape as the latent weights (detached).
    w_t: Tensor,
    /// Latent weights divided by α (carries the gradient in training).
    w_scaled: Tensor,
    /// α·s_in per output channel, shape (out,).
    scale: Tensor,
    /// Integer bias (detached), shape (out,).
    b_int: Tensor,
    /// Bias divided by the scale (carries the gradient in training).
    b_scaled: Tensor,
}

impl QLayer {
    fn out_dim(&self) -> candle_core::Result<usize> {
        self.w.as_tensor().dim(0)
    }

    fn qparams(&self, s_in: &Tensor) -> candle_core::Result<QParams> {
        let w = self.w.as_tensor();
        let out = w.dim(0)?;
        let abs = w.abs()?.flatten_from(1)?;
        let mean_abs = if self.per_channel {
            abs.mean(1)?
        } else {
            abs.flatten_all()?
                .mean(0)?
                .broadcast_as(out)?
                .contiguous()?
        };
        // α is a statistic of the weights, not a trained parameter (TWN); the epsilon keeps
        // an all-zero channel finite.
        let alpha = mean_abs.affine(TWN_ALPHA, 1e-12)?.detach();
        let mut bshape = vec![out];
        bshape.extend(std::iter::repeat_n(1, w.rank() - 1));
        let w_scaled = w.broadcast_div(&alpha.reshape(bshape)?)?;
        let w_t = w_scaled
            .round()?
            .clamp(self.levels[0] as f32, self.levels[1] as f32)?
            .detach();
        let scale = alpha.broadcast_mul(s_in)?;
        let b_scaled = self.b.as_tensor().div(&scale)?;
        let b_int = b_scaled.round()?.detach();
        Ok(QParams {
            w_t,
            w_scaled,
            scale,
            b_int,
            b_scaled,
        })
    }

    /// z = α·s_in·(Σ w_t·x + b_int) for x holding integers.
    fn forward(&self, x: &Tensor, s_in: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let q = self.qparams(s_in)?;
        let (w, b) = match mode {
            Mode::Train => (ste(&q.w_scaled, &q.w_t)?, ste(&q.b_scaled, &q.b_int)?),
            Mode::Eval | Mode::Calibrate => (q.w_t, q.b_int),
        };
        let out = self.out_dim()?;
        let (acc, shape) = match self.kind {
            LayerKind::Conv {
                stride, padding, ..
            } => (x.conv2d(&w, padding, stride, 1, 1)?, vec![1, out, 1, 1]),
            LayerKind::Dense => (x.matmul(&w.t()?)?, vec![1, out]),
        };
        acc.broadcast_add(&b.reshape(shape.clone())?)?
            .broadcast_mul(&q.scale.reshape(shape)?)
    }
}

/// Straight-through estimator: the value of `q`, the gradient of `v`.
pub(crate) fn ste(v: &Tensor, q: &Tensor) -> candle_core::Result<Tensor> {
    v + (q - v)?.detach()
}

/// A quantized ReLU: its learned scale (as a log, so it stays positive) and top code.
struct QAct {
    log_s: Var,
    top: f32,
}

impl QAct {
    fn scale(&self) -> candle_core::Result<Tensor> {
        self.log_s.as_tensor().exp()
    }

    /// y_int = clamp(round(z / s), 0, top); returns it and s.
    fn forward(&self, z: &Tensor, mode: Mode) -> candle_core::Result<(Tensor, Tensor)> {
        if mode == Mode::Calibrate {
            let s = calibrate_scale(&z.flatten_all()?.to_vec1::<f32>()?, self.top);
            self.log_s
                .set(&Tensor::new(s.ln(), z.device())?.reshape(())?)?;
        }
        let s = self.scale()?;
        let y = z.broadcast_div(&s)?.clamp(0f32, self.top)?;
        let r = y.round()?.detach();
        let y = if mode == Mode::Train { ste(&y, &r)? } else { r };
        Ok((y, s))
    }
}

/// The scale minimising the squared error of quantizing relu(z) to `0..=top` steps.
fn calibrate_scale(z: &[f32], top: f32) -> f32 {
    let pos: Vec<f32> = z.iter().map(|&v| v.max(0.0)).collect();
    let max = pos.iter().copied().fold(0f32, f32::max);
    if max <= 0.0 {
        return 1.0;
    }
    let err = |s: f32| -> f64 {
        pos.iter()
            .map(|&v| {
                let q = (v / s).round().clamp(0.0, top) * s;
                ((v - q) as f64).powi(2)
            })
            .sum()
    };
    (1..=100)
        .map(|i| max * i as f32 / (100.0 * top))
        .min_by(|&a, &b| err(a).total_cmp(&err(b)))
        .unwrap()
}

struct Net {
    conv: QLayer,
    conv_act: QAct,
    pool: Option<usize>,
    hidden: Option<(QLayer, QAct)>,
    out: QLayer,
    /// Log of the softmax temperature: the classifier's logits are the integer accumulators
    /// times a scale the loss should not depend on, so the loss learns its own.
    log_temp: Var,
    /// Input scale as a scalar tensor.
    s_in: Tensor,
}

impl Net {
    /// Float logits (α·s·accumulator of the classifier), before the temperature.
    fn forward(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let z = self.conv.forward(x, &self.s_in, mode)?;
        let (mut y, mut s) = self.conv_act.forward(&z, mode)?;
        if let Some(p) = self.pool {
            y = y.max_pool2d(p)?;
        }
        y = y.flatten_from(1)?;
        if let Some((layer, act)) = &self.hidden {
            let z = layer.forward(&y, &s, mode)?;
            (y, s) = act.forward(&z, mode)?;
        }
        self.out.forward(&y, &s, mode)
    }

    fn loss_logits(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        self.forward(x, mode)?
            .broadcast_mul(&self.log_temp.as_tensor().exp()?)
    }
}

/// Shapes derived from the config and the data, checked once.
struct Geometry {
    in_shape: [usize; 3],
    conv_out: [usize; 3],
    features: usize,
    classes: usize,
}

fn check(cfg: &TrainConfig, train: &Dataset, test: &Dataset) -> Result<Geometry, TrainError> {
    let bad = |m: String| Err(TrainError::Config(m));
    if cfg.conv_channels == 0 || cfg.kernel == 0 || cfg.stride == 0 {
        return bad("conv_channels, kernel and stride must be positive".into());
    }
    if cfg.epochs == 0
        || cfg.batch_size == 0
        || cfg.learning_rate.is_nan()
        || cfg.learning_rate <= 0.0
    {
        return bad("epochs, batch_size and learning_rate must be positive".into());
    }
    for (what, b) in [("input_bits", cfg.input_bits), ("act_bits", cfg.act_bits)] {
        if !(1..=MAX_ACT_BITS).contains(&b) {
            return bad(format!("{what} must be 1..={MAX_ACT_BITS}, got {b}"));
        }
    }
    let [wl, wh] = cfg.weight_levels;
    if !(wl <= 0 && wh >= 0 && wh > wl && (wh as i16 - wl as i16) <= 3) {
        return bad(format!(
            "weight levels {:?} must contain 0 and span at most 4 values (e.g. [-1, 1] or [-2, 1])",
            cfg.weight_levels
        ));
    }
    if cfg.hidden == Some(0) || cfg.pool == Some(0) {
        return bad("hidden and pool must be positive when set".into());
    }
    let (in_shape, classes) = check_data(train, test)?;
    let dim = |n| fhecam_engine::model::out_dim(n, cfg.kernel, cfg.stride, cfg.padding);
    let (Some(oh), Some(ow)) = (dim(train.height), dim(train.width)) else {
        return bad(format!(
            "kernel {} stride {} padding {} does not fit {}x{} images",
            cfg.kernel, cfg.stride, cfg.padding, train.height, train.width
        ));
    };
    let conv_out = [cfg.conv_channels, oh, ow];
    let (ph, pw) = match cfg.pool {
        Some(p) => match (
            fhecam_engine::model::out_dim(oh, p, p, 0),
            fhecam_engine::model::out_dim(ow, p, p, 0),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => return bad(format!("pool {p} does not fit the {oh}x{ow} conv output")),
        },
        None => (oh, ow),
    };
    Ok(Geometry {
        in_shape,
        conv_out,
        features: cfg.conv_channels * ph * pw,
        classes,
    })
}

/// Both splits non-empty, of the same image shape, one label per image, ≥ 2 classes;
/// returns the image shape (C, H, W) and the number of classes.
pub(crate) fn check_data(
    train: &Dataset,
    test: &Dataset,
) -> Result<([usize; 3], usize), TrainError> {
    if train.is_empty() || test.is_empty() {
        return Err(TrainError::Data(
            "train and test splits must be non-empty".into(),
        ));
    }
    let in_shape = [train.channels, train.height, train.width];
    if [test.channels, test.height, test.width] != in_shape {
        return Err(TrainError::Data(format!(
            "train images are {in_shape:?} but test images are {:?}",
            [test.channels, test.height, test.width]
        )));
    }
    let n_px: usize = in_shape.iter().product();
    for ds in [train, test] {
        if ds.images.len() != ds.labels.len() || ds.images.iter().any(|i| i.len() != n_px) {
            return Err(TrainError::Data(format!(
                "every image must have {n_px} values and a label"
            )));
        }
    }
    let classes = train.num_classes().max(test.num_classes());
    if classes < 2 {
        return Err(TrainError::Data("need at least two classes".into()));
    }
    Ok((in_shape, classes))
}

/// Uniform(-b, b) with b = sqrt(3 / fan_in) (unit output variance for unit inputs).
fn init_tensor(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    fan_in: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let b = (3.0 / fan_in as f32).sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-b..b)).collect();
    Tensor::from_vec(v, shape, dev)
}

fn build_net(
    cfg: &TrainConfig,
    g: &Geometry,
    s_in: f32,
    varmap: &VarMap,
    dev: &Device,
) -> candle_core::Result<Net> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
    // candle cannot seed its CPU generator, so initial values come from our own ChaCha8.
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut var = |name: &str, shape: &[usize], fan_in: Option<usize>| {
        vb.get_with_hints(shape, name, Init::Const(0.0))?;
        let v = varmap.data().lock().unwrap()[name].clone();
        if let Some(f) = fan_in {
            v.set(&init_tensor(&mut rng, shape, f, dev)?)?;
        }
        Ok::<Var, candle_core::Error>(v)
    };
    let c_in = g.in_shape[0];
    let k = cfg.kernel;
    let top = ((1u32 << cfg.act_bits) - 1) as f32;
    let conv = QLayer {
        w: var(
            "conv.weight",
            &[cfg.conv_channels, c_in, k, k],
            Some(c_in * k * k),
        )?,
        b: var("conv.bias", &[cfg.conv_channels], None)?,
        kind: LayerKind::Conv {
            kernel: k,
            stride: cfg.stride,
            padding: cfg.padding,
        },
        per_channel: true,
        levels: cfg.weight_levels,
    };
    let conv_act = QAct {
        log_s: var("conv.act_log_scale", &[], None)?,
        top,
    };
    let mut n_in = g.features;
    let hidden = match cfg.hidden {
        Some(h) => {
            let layer = QLayer {
                w: var("hidden.weight", &[h, n_in], Some(n_in))?,
                b: var("hidden.bias", &[h], None)?,
                kind: LayerKind::Dense,
                per_channel: true,
                levels: cfg.weight_levels,
            };
            let act = QAct {
                log_s: var("hidden.act_log_scale", &[], None)?,
                top,
            };
            n_in = h;
            Some((layer, act))
        }
        None => None,
    };
    let out = QLayer {
        w: var("out.weight", &[g.classes, n_in], Some(n_in))?,
        b: var("out.bias", &[g.classes], None)?,
        kind: LayerKind::Dense,
        per_channel: false,
        levels: cfg.weight_levels,
    };
    Ok(Net {
        conv,
        conv_act,
        pool: cfg.pool,
        hidden,
        out,
        log_temp: var("out.log_temperature", &[], None)?,
        s_in: Tensor::new(s_in, dev)?,
    })
}

/// Integer inputs (as f32) of a data set, shape (N, C, H, W).
pub(crate) fn input_tensor(
    ds: &Dataset,
    spec: &InputSpec,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = ds
        .images
        .iter()
        .flat_map(|img| spec.quantize(img))
        .map(f32::from)
        .collect();
    Tensor::from_vec(v, (ds.len(), ds.channels, ds.height, ds.width), dev)
}

pub fn train(
    cfg: &TrainConfig,
    train: &Dataset,
    test: &Dataset,
    progress: &dyn Fn(usize, f32),
) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    let g = check(cfg, train, test)?;
    let dev = Device::Cpu;
    let spec = unit_input(g.in_shape, cfg.input_bits);
    let varmap = VarMap::new();
    let net = build_net(cfg, &g, spec.scale, &varmap, &dev).ctx("building the network")?;

    let x_train = input_tensor(train, &spec, &dev).ctx("train inputs")?;
    let y_train = label_tensor(train, &dev)?;
    let x_test = input_tensor(test, &spec, &dev).ctx("test inputs")?;

    // Scales from the data before the first step; the temperature so that the initial
    // logits have unit spread.
    let logits = net
        .forward(&x_train, Mode::Calibrate)
        .ctx("calibrating activation scales")?;
    let spread = logits
        .flatten_all()
        .and_then(|l| l.var(0))
        .and_then(|v| v.to_scalar::<f32>())
        .ctx("calibrating temperature")?;
    let temp = if spread > 1e-12 {
        -0.5 * spread.ln()
    } else {
        0.0
    };
    net.log_temp
        .set(&Tensor::new(temp, &dev).ctx("temperature")?)
        .ctx("setting temperature")?;

    let epochs = Epochs {
        learning_rate: cfg.learning_rate,
        batch_size: cfg.batch_size,
        epochs: cfg.epochs,
        seed: cfg.seed,
    };
    let final_loss = epochs.run(
        varmap.all_vars(),
        (&x_train, &y_train),
        progress,
        &mut |xb, _| net.loss_logits(xb, Mode::Train),
    )?;

    let logits = net
        .forward(&x_test, Mode::Eval)
        .and_then(|l| l.to_vec2::<f32>())
        .ctx("evaluating the test split")?;
    let predictions_float: Vec<usize> = logits.iter().map(|l| reference::argmax(l)).collect();
    let model = export(&net, cfg, &g, spec).ctx("exporting the model")?;
    verify_tables(&model)?;
    let scores = Scores::measure(&model, test, predictions_float, final_loss, started)?;
    Ok(TrainReport {
        model,
        train_samples: train.len(),
        scores,
    })
}

/// The input of a built-in model: `bits` levels over the data's [0, 1].
pub(crate) fn unit_input(shape: [usize; 3], bits: u8) -> InputSpec {
    InputSpec {
        channels: shape[0],
        height: shape[1],
        width: shape[2],
        bits,
        scale: 1.0 / ((1u32 << bits) - 1) as f32,
        zero: 0.0,
    }
}

pub(crate) fn label_tensor(ds: &Dataset, dev: &Device) -> Result<Tensor, TrainError> {
    let y: Vec<u32> = ds.labels.iter().map(|&l| l as u32).collect();
    Tensor::new(y.as_slice(), dev).ctx("train labels")
}

/// The mini-batch schedule both built-in families train with: AdamW, shuffled batches,
/// cosine learning-rate decay (large steps to find the weight or table pattern, small ones
/// to settle it).
pub(crate) struct Epochs {
    pub learning_rate: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
}

impl Epochs {
    /// Trains `vars` on `(x, y)` with the logits `logits(batch, rng)` gives (the batch
    /// order's generator, which a forward pass may draw from too); `progress(epoch, mean
    /// loss)` after every epoch. Returns the last epoch's mean loss.
    pub(crate) fn run(
        &self,
        vars: Vec<Var>,
        (x, y): (&Tensor, &Tensor),
        progress: &dyn Fn(usize, f32),
        logits: &mut dyn FnMut(&Tensor, &mut ChaCha8Rng) -> candle_core::Result<Tensor>,
    ) -> Result<f32, TrainError> {
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: self.learning_rate,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .ctx("creating the optimizer")?;
        let n = y.dim(0).ctx("train labels")?;
        let total_steps = (n.div_ceil(self.batch_size) * self.epochs) as f64;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x005e_ed0f_da7a);
        let mut order: Vec<u32> = (0..n as u32).collect();
        let (mut step, mut final_loss) = (0usize, f32::NAN);
        for epoch in 0..self.epochs {
            order.shuffle(&mut rng);
            let mut loss_sum = 0f64;
            for batch in order.chunks(self.batch_size) {
                let t = step as f64 / total_steps;
                opt.set_learning_rate(
                    self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
                );
                let idx = Tensor::new(batch, x.device()).ctx("batch indices")?;
                let xb = x.index_select(&idx, 0).ctx("batch inputs")?;
                let yb = y.index_select(&idx, 0).ctx("batch labels")?;
                let logits = logits(&xb, &mut rng).ctx("forward pass")?;
                let loss = candle_nn::loss::cross_entropy(&logits, &yb).ctx("loss")?;
                opt.backward_step(&loss).ctx("backward pass")?;
                loss_sum += loss.to_scalar::<f32>().ctx("loss value")? as f64 * batch.len() as f64;
                step += 1;
            }
            final_loss = (loss_sum / n as f64) as f32;
            progress(epoch, final_loss);
        }
        Ok(final_loss)
    }
}

/// Per test sample, the class the integer model picks (`reference::argmax`).
pub(crate) fn plain_predictions(model: &Model, test: &Dataset) -> Result<Vec<usize>, TrainError> {
    test.images
        .iter()
        .map(|img| {
            let logits = reference::evaluate(model, &model.input.quantize(img))?;
            Ok(reference::argmax(&logits))
        })
        .collect()
}

/// The share of `predictions` that match the test labels.
pub(crate) fn accuracy(predictions: &[usize], test: &Dataset) -> f64 {
    predictions
        .iter()
        .zip(&test.labels)
        .filter(|(&p, &l)| p == l as usize)
        .count() as f64
        / test.len() as f64
}

/// Integer parameters of a layer: ternary weights, integer biases, the public bias bound and
/// α·s_in per output channel.
struct IntLayer {
    weights: Vec<i8>,
    bias: Vec<i32>,
    bias_range: [i32; 2],
    scale: Vec<f32>,
}

fn int_layer(layer: &QLayer, s_in: &Tensor) -> candle_core::Result<IntLayer> {
    let q = layer.qparams(s_in)?;
    let weights = q
        .w_t
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|w| w as i8)
        .collect();
    let bias: Vec<i32> = q
        .b_int
        .to_vec1::<f32>()?
        .into_iter()
        .map(|b| b as i32)
        .collect();
    // Publish a power-of-two bound, not the extreme bias itself.
    let max = bias.iter().map(|b| b.unsigned_abs()).max().unwrap_or(0);
    let mut k = 1;
    while (1u64 << k) - 1 < max as u64 {
        k += 1;
    }
    let bound = ((1u64 << k) - 1) as i32;
    Ok(IntLayer {
        weights,
        bias,
        bias_range: [-bound, bound],
        scale: q.scale.to_vec1::<f32>()?,
    })
}

/// Accumulator range of a layer with `n` taps on inputs in 0..=x_max and weights in
/// `levels` (as `Model::infer` computes it).
fn acc_range(n: usize, x_max: i64, levels: [i8; 2], bias_bound: i32) -> (i64, i64) {
    let n = n as i64;
    let lo = (levels[0] as i64 * x_max).min(0) * n - bias_bound as i64;
    let hi = (levels[1] as i64 * x_max).max(0) * n + bias_bound as i64;
    (lo, hi)
}

/// One table per channel: accumulator s ↦ clamp(round(scale_c·s / s_out), 0, top).
fn act_tables(lo: i64, hi: i64, scale: &[f32], s_out: f32, top: u8) -> Vec<ActTable> {
    scale
        .iter()
        .map(|&sc| {
            ActTable::from_fn(lo, hi, |s| {
                (sc as f64 * s as f64 / s_out as f64)
                    .round()
                    .clamp(0.0, top as f64) as u8
            })
        })
        .collect()
}

fn max_code(tables: &[ActTable]) -> i64 {
    tables
        .iter()
        .flat_map(|t| t.values.iter().copied())
        .max()
        .unwrap_or(0) as i64
}

fn export(
    net: &Net,
    cfg: &TrainConfig,
    g: &Geometry,
    spec: InputSpec,
) -> candle_core::Result<Model> {
    let top = ((1u32 << cfg.act_bits) - 1) as u8;
    let mut nodes: Vec<Node> = Vec::new();
    let mut push = |op: Op| {
        let inputs = vec![nodes.len()];
        nodes.push(Node { op, inputs });
    };

    let conv = int_layer(&net.conv, &net.s_in)?;
    let (lo, hi) = acc_range(
        g.in_shape[0] * cfg.kernel * cfg.kernel,
        ((1u32 << spec.bits) - 1) as i64,
        cfg.weight_levels,
        conv.bias_range[1],
    );
    let s1 = net.conv_act.scale()?.to_scalar::<f32>()?;
    let tables = act_tables(lo, hi, &conv.scale, s1, top);
    let x_max = max_code(&tables);
    let LayerKind::Conv {
        kernel,
        stride,
        padding,
    } = net.conv.kind
    else {
        unreachable!("the first layer is a convolution")
    };
    push(Op::Conv2d(Conv2d {
        out_channels: g.conv_out[0],
        kernel: [kernel; 2],
        stride: [stride; 2],
        padding: [padding; 2],
        weights: conv.weights,
        bias: conv.bias,
        weight_range: cfg.weight_levels,
        bias_range: conv.bias_range,
    }));
    push(Op::Activation(Activation {
        bits: cfg.act_bits,
        tables,
    }));
    if let Some(p) = cfg.pool {
        push(Op::MaxPool(MaxPool {
            kernel: [p; 2],
            stride: [p; 2],
        }));
    }
    push(Op::Flatten(Flatten {}));

    let mut s = net.conv_act.scale()?;
    if let Some((layer, act)) = &net.hidden {
        let h = int_layer(layer, &s)?;
        let (lo, hi) = acc_range(g.features, x_max, cfg.weight_levels, h.bias_range[1]);
        let s_out = act.scale()?.to_scalar::<f32>()?;
        let tables = act_tables(lo, hi, &h.scale, s_out, top);
        push(Op::Dense(Dense {
            out_features: h.bias.len(),
            weights: h.weights,
            bias: h.bias,
            weight_range: cfg.weight_levels,
            bias_range: h.bias_range,
        }));
        push(Op::Activation(Activation {
            bits: cfg.act_bits,
            tables,
        }));
        s = act.scale()?;
    }
    let out = int_layer(&net.out, &s)?;
    push(Op::Dense(Dense {
        out_features: g.classes,
        weights: out.weights,
        bias: out.bias,
        weight_range: cfg.weight_levels,
        bias_range: out.bias_range,
    }));

    Ok(Model {
        format_version: MODEL_FORMAT_VERSION,
        name: "digits-cnn".into(),
        input: spec,
        nodes,
        num_classes: g.classes,
    })
}

/// Every activation table must cover exactly the accumulator range `infer` derives.
fn verify_tables(model: &Model) -> Result<(), TrainError> {
    let infos = model.infer()?;
    for (i, node) in model.nodes.iter().enumerate() {
        if let Op::Activation(Activation { tables, .. }) = &node.op {
            let Kind::Acc { lo, hi } = infos[node.inputs[0]].kind else {
                return Err(TrainError::Export(format!(
                    "node {i}: activation input is not an accumulator"
                )));
            };
            for t in tables {
                if t.min != lo || t.values.len() as i64 != hi - lo + 1 {
                    return Err(TrainError::Export(format!(
                        "node {i}: table covers {}..={} but the accumulator spans {lo}..={hi}",
                        t.min,
                        t.min + t.values.len() as i64 - 1
                    )));
                }
            }
        }
    }
    Ok(())
}
