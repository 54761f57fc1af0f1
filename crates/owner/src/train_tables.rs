//! Training of a secret-table network (issue 23) with candle, exported to `Lut`/`GroupSum`
//! layers of the integer `Model`.
//!
//! The network, on 4-bit pixels:
//! - layer 0: `thresholds` learned thresholds per pixel, bit = [x > t] (a 16-entry table);
//!   in training, bits of layers 0–2 are flipped at random (`flip`) against overfitting;
//! - layer 1: `n1` tables over 4 of those bits (index b0 + 2b1 + 4b2 + 8b3), binary output;
//! - layer 2: `n2` tables over 4 layer-1 bits, binary output;
//! - output: the layer-2 bits in groups of `group_size`, each group's table holding one
//!   score in `0..=2^score_bits - 1` per class; the logits are the sums of the scores.
//!
//! Each table is a differentiable lookup: the multilinear interpolation
//! `Σ_idx T[idx] Π_k (b_k or 1 − b_k)`, which is exactly `T[idx]` for binary inputs, on bits
//! binarized with a straight-through estimator (value of the step, gradient of a sigmoid).
//! Class scores are rounded in the forward pass (quantization-aware: in the issue's
//! experiment, rounding after training lost 8–10 points). The evaluation forward pass uses the exact integers, so the
//! exported tables classify like it; the integer model (`reference`) is the truth.
//!
//! Wiring is random (seeded) and respects the engine's rule that every element is read with
//! one multiplier: a layer's input elements are split into 4 classes and the k-th input of
//! every neuron (multiplier 2^k) comes from class k (for layer 1's default local wiring,
//! the class of a pixel's bits is the pixel's parity, see [`WiringKind::Local`]).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Dataset;
use crate::train::{
    check_data, input_tensor, label_tensor, ste, unit_input, Ctx, Epochs, Scores, TrainError,
};
use fhecam_engine::fhe::eval;
use fhecam_engine::fhe::eval::InputMode;
use fhecam_engine::model::{
    GroupSum, InputSpec, Lut, LutNeuron, Model, Node, Op, MODEL_FORMAT_VERSION,
};

/// Inputs of a hidden table (binary inputs, multipliers 1, 2, 4, 8: one 4-bit index).
const FAN_IN: usize = 4;
/// Sigmoid width of the straight-through surrogate, in pixel levels for the thresholds and
/// in table units for the tables.
const TAU_THRESHOLD: f64 = 1.5;
const TAU_TABLE: f64 = 0.5;

#[derive(Clone, Debug, PartialEq)]
pub struct TablesConfig {
    /// Learned thresholds per pixel (layer 0 has pixels × thresholds bits).
    pub thresholds: usize,
    /// Tables of layer 1.
    pub n1: usize,
    /// Tables of layer 2 (a multiple of `group_size`).
    pub n2: usize,
    /// Layer-2 bits per output group (2 or 4).
    pub group_size: usize,
    /// Bits of a class score (1..=4).
    pub score_bits: u8,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub seed: u64,
    /// Bits per input pixel (the thresholds' tables have 2^bits entries).
    pub input_bits: u8,
    /// How layer 1 picks its inputs.
    pub wiring: WiringKind,
    /// In training, each bit of layers 0–2 is flipped with this probability (the tables
    /// otherwise fit the training split exactly and generalise worse).
    pub flip: f64,
}

/// Layer 1's wiring (layer 2 is always random).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WiringKind {
    /// Any 4 layer-0 bits, one from each of 4 random classes.
    Random,
    /// A random 2x2 patch of pixels, one bit (a random threshold) of each pixel; the
    /// pixel's parity (y mod 2, x mod 2) is its class, so each bit keeps one multiplier.
    Local,
}

impl Default for TablesConfig {
    /// The built-in preset.
    fn default() -> Self {
        TablesConfig {
            thresholds: 4,
            n1: 512,
            n2: 96,
            group_size: 4,
            score_bits: 2,
            epochs: 120,
            batch_size: 64,
            learning_rate: 0.02,
            seed: 42,
            input_bits: 4,
            wiring: WiringKind::Local,
            flip: 0.02,
        }
    }
}

/// PBS per frame of a model as the engine plans it (the run spends exactly these).
pub fn planned_pbs(model: &Model, mode: InputMode) -> Result<u64, TrainError> {
    let (pbs, _) = eval::plan_mode(model, mode).map_err(|e| TrainError::Export(e.to_string()))?;
    Ok(pbs.iter().sum())
}

/// Sizes tried by [`TablesConfig::for_budget`], largest first.
const LADDER: [usize; 9] = [192, 160, 128, 112, 96, 80, 64, 32, 16];

impl TablesConfig {
    /// The preset, resized to the largest layer 2 whose device-clear PBS plan
    /// ([`planned_pbs`]) is at most `budget` (layer 1 has 8 tables per layer-2 table,
    /// at most 512, at least 64; the epochs shrink with the network for the tiny sizes).
    pub fn for_budget(budget: u64, classes: usize) -> Result<Self, TrainError> {
        for n2 in LADDER {
            let cfg = TablesConfig {
                n1: (8 * n2).clamp(64, 512),
                n2,
                epochs: if n2 <= 32 { 30 } else { 120 },
                ..TablesConfig::default()
            };
            if cfg.estimate(InputMode::DeviceClear, [1, 8, 8], classes)? <= budget {
                return Ok(cfg);
            }
        }
        Err(TrainError::Config(format!(
            "no secret-table network fits {budget} PBS per frame (the smallest needs {})",
            TablesConfig {
                n1: 64,
                n2: LADDER[LADDER.len() - 1],
                ..TablesConfig::default()
            }
            .estimate(InputMode::DeviceClear, [1, 8, 8], classes)?
        )))
    }

    /// PBS per frame of this architecture on images of `shape` (tables all zero: the count
    /// depends on the wiring and sizes only).
    pub fn estimate(
        &self,
        mode: InputMode,
        shape: [usize; 3],
        classes: usize,
    ) -> Result<u64, TrainError> {
        let w = Wiring::new(self, shape, classes)?;
        let model = w.model(
            self,
            &unit_input(shape, self.input_bits),
            &Tables::zero(self, &w, classes),
        );
        planned_pbs(&model, mode)
    }

    fn check(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !(1..=15).contains(&self.thresholds) || self.n1 == 0 || self.n2 == 0 {
            return bad("thresholds must be 1..=15 and n1, n2 positive".into());
        }
        if self.n1 > 1 << 16 || self.n2 > 1 << 16 {
            return bad("n1 and n2 must be at most 65536".into());
        }
        if !matches!(self.group_size, 2 | 4) || !self.n2.is_multiple_of(self.group_size) {
            return bad(format!(
                "group_size must be 2 or 4 and divide n2 = {} (got {})",
                self.n2, self.group_size
            ));
        }
        if !(1..=4).contains(&self.score_bits) || !(1..=4).contains(&self.input_bits) {
            return bad("score_bits and input_bits must be 1..=4".into());
        }
        if !(0.0..0.5).contains(&self.flip) {
            return bad(format!("flip must be in [0, 0.5), got {}", self.flip));
        }
        if self.epochs == 0
            || self.batch_size == 0
            || self.learning_rate.is_nan()
            || self.learning_rate <= 0.0
        {
            return bad("epochs, batch_size and learning_rate must be positive".into());
        }
        Ok(())
    }

    fn score_max(&self) -> u8 {
        (1u8 << self.score_bits) - 1
    }
}

#[derive(Clone, Debug)]
pub struct TablesReport {
    pub model: Model,
    pub config: TablesConfig,
    pub scores: Scores,
    /// PBS per frame with device-clear input, as the engine plans it ([`planned_pbs`]).
    pub pbs_device_clear: u64,
    /// The same with encrypted input.
    pub pbs_encrypted: u64,
}

/// Which input elements every neuron reads (public, seeded).
struct Wiring {
    pixels: usize,
    /// Per layer-1 table, its 4 layer-0 bits (k-th from class k).
    l1: Vec<[u32; FAN_IN]>,
    l2: Vec<[u32; FAN_IN]>,
    classes: usize,
}

/// `n_out` neurons of 4 inputs over `n_in` elements: the elements are split into 4 classes
/// at random and the k-th input of every neuron comes from class k, so each element has one
/// multiplier (2^k); each class is read in shuffled rounds, so reads are balanced (with
/// `n_in = 4·n_out` every element is read exactly once).
fn wire(rng: &mut ChaCha8Rng, n_in: usize, n_out: usize) -> Vec<[u32; FAN_IN]> {
    let mut perm: Vec<u32> = (0..n_in as u32).collect();
    perm.shuffle(rng);
    let classes: Vec<Vec<u32>> = (0..FAN_IN)
        .map(|k| perm.iter().skip(k).step_by(FAN_IN).copied().collect())
        .collect();
    let cols: Vec<Vec<u32>> = classes
        .iter()
        .map(|c| {
            let mut col = Vec::with_capacity(n_out);
            while col.len() < n_out {
                let mut round = c.clone();
                round.shuffle(rng);
                col.extend(round.into_iter().take(n_out - col.len()));
            }
            col
        })
        .collect();
    (0..n_out)
        .map(|j| std::array::from_fn(|k| cols[k][j]))
        .collect()
}

/// `n_out` neurons over 2x2 pixel patches of a (C, H, W) image with `t` bits per pixel
/// (pixel-major): positions in shuffled rounds, thresholds at random; input k is the
/// patch's pixel of parity class k (k = 2·(y mod 2) + x mod 2).
fn wire_local(
    rng: &mut ChaCha8Rng,
    shape: [usize; 3],
    t: usize,
    n_out: usize,
) -> Vec<[u32; FAN_IN]> {
    let [c, h, w] = shape;
    let positions: Vec<(usize, usize, usize)> = (0..c)
        .flat_map(|ch| (0..h - 1).flat_map(move |y| (0..w - 1).map(move |x| (ch, y, x))))
        .collect();
    let mut out = Vec::with_capacity(n_out);
    while out.len() < n_out {
        let mut round = positions.clone();
        round.shuffle(rng);
        for (ch, y, x) in round.into_iter().take(n_out - out.len()) {
            out.push(std::array::from_fn(|k| {
                let (dy, dx) = ((k / 2 + y % 2) % 2, (k % 2 + x % 2) % 2);
                let pixel = (ch * h + y + dy) * w + x + dx;
                (pixel * t + rng.gen_range(0..t)) as u32
            }));
        }
    }
    out
}

impl Wiring {
    fn new(cfg: &TablesConfig, shape: [usize; 3], classes: usize) -> Result<Self, TrainError> {
        cfg.check()?;
        let pixels: usize = shape.iter().product();
        if cfg.wiring == WiringKind::Local && (shape[1] < 2 || shape[2] < 2) {
            return Err(TrainError::Config(format!(
                "local wiring needs images of at least 2x2 pixels, got {}x{}",
                shape[1], shape[2]
            )));
        }
        let bits0 = pixels * cfg.thresholds;
        if bits0 < FAN_IN || cfg.n1 < FAN_IN {
            return Err(TrainError::Config(format!(
                "layers 0 and 1 need at least {FAN_IN} outputs each (got {bits0} and {})",
                cfg.n1
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x0077_1e5a);
        Ok(Wiring {
            pixels,
            l1: match cfg.wiring {
                WiringKind::Random => wire(&mut rng, bits0, cfg.n1),
                WiringKind::Local => wire_local(&mut rng, shape, cfg.thresholds, cfg.n1),
            },
            l2: wire(&mut rng, cfg.n1, cfg.n2),
            classes,
        })
    }

    /// The integer model with these wires and tables.
    fn model(&self, cfg: &TablesConfig, spec: &InputSpec, t: &Tables) -> Model {
        let muls: Vec<u16> = (0..FAN_IN).map(|k| 1 << k).collect();
        let hidden = |w: &[[u32; FAN_IN]], tables: &[Vec<u8>]| {
            Op::Lut(Lut {
                out_max: 1,
                neurons: w
                    .iter()
                    .zip(tables)
                    .map(|(inp, tab)| LutNeuron {
                        inputs: inp.to_vec(),
                        mul: muls.clone(),
                        table: tab.clone(),
                    })
                    .collect(),
                public: false,
            })
        };
        let gs = cfg.group_size as u32;
        let layer0 = Op::Lut(Lut {
            out_max: 1,
            neurons: t
                .l0
                .iter()
                .enumerate()
                .map(|(i, tab)| LutNeuron {
                    inputs: vec![(i / cfg.thresholds) as u32],
                    mul: vec![1],
                    table: tab.clone(),
                })
                .collect(),
            public: false,
        });
        let out = Op::GroupSum(GroupSum {
            classes: self.classes,
            score_max: cfg.score_max(),
            groups: t
                .scores
                .iter()
                .enumerate()
                .map(|(g, tab)| LutNeuron {
                    inputs: (0..gs).map(|k| g as u32 * gs + k).collect(),
                    mul: muls[..cfg.group_size].to_vec(),
                    table: tab.clone(),
                })
                .collect(),
        });
        let ops = [
            layer0,
            hidden(&self.l1, &t.l1),
            hidden(&self.l2, &t.l2),
            out,
        ];
        Model {
            format_version: MODEL_FORMAT_VERSION,
            name: "digits-tables".into(),
            input: spec.clone(),
            nodes: ops
                .into_iter()
                .enumerate()
                .map(|(k, op)| Node {
                    op,
                    inputs: vec![k],
                })
                .collect(),
            num_classes: self.classes,
        }
    }
}

/// The integer tables of every layer (layer 0: one per pixel and threshold, pixel-major;
/// output: one per group, `idx * classes + c`).
struct Tables {
    l0: Vec<Vec<u8>>,
    l1: Vec<Vec<u8>>,
    l2: Vec<Vec<u8>>,
    scores: Vec<Vec<u8>>,
}

impl Tables {
    fn zero(cfg: &TablesConfig, w: &Wiring, classes: usize) -> Self {
        let levels = 1usize << cfg.input_bits;
        Tables {
            l0: vec![vec![0; levels]; w.pixels * cfg.thresholds],
            l1: vec![vec![0; 16]; cfg.n1],
            l2: vec![vec![0; 16]; cfg.n2],
            scores: vec![vec![0; classes << cfg.group_size]; cfg.n2 / cfg.group_size],
        }
    }
}

/// The float network: trained parameters and the wiring as index tensors.
struct Net {
    /// (pixels, thresholds), in pixel levels.
    thresholds: Var,
    /// (n1, 16) and (n2, 16): a table's sign is its bit.
    t1: Var,
    t2: Var,
    /// (groups · 2^group_size, classes): scores before rounding.
    scores: Var,
    log_temp: Var,
    /// Per layer, the k-th inputs of its neurons (k = 0..4), as u32 index tensors.
    w1: Vec<Tensor>,
    w2: Vec<Tensor>,
    wg: Vec<Tensor>,
    groups: usize,
    score_max: f64,
}

fn uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    lo: f32,
    hi: f32,
    dev: &Device,
) -> candle_core::Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
}

/// The k-th inputs of every neuron, one index tensor per k.
fn columns(w: &[[u32; FAN_IN]], fan_in: usize, dev: &Device) -> candle_core::Result<Vec<Tensor>> {
    (0..fan_in)
        .map(|k| Tensor::new(w.iter().map(|i| i[k]).collect::<Vec<u32>>(), dev))
        .collect()
}

/// Step at 0 with a sigmoid's gradient (width `tau`) in training.
fn binarize(z: &Tensor, tau: f64, train: bool) -> candle_core::Result<Tensor> {
    let hard = z.gt(0f32)?.to_dtype(DType::F32)?;
    if !train {
        return Ok(hard);
    }
    let soft = candle_nn::ops::sigmoid(&z.affine(1.0 / tau, 0.0)?)?;
    ste(&soft, &hard)
}

/// `b` with each bit flipped with probability `p`: b + m·(1 − 2b) for a seeded mask m.
fn flip_bits(b: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..b.elem_count())
        .map(|_| f32::from(u8::from(rng.gen_bool(p))))
        .collect();
    let m = Tensor::from_vec(m, b.shape(), b.device())?;
    b + m.mul(&b.affine(-2.0, 1.0)?)?
}

/// Multilinear interpolation basis of neurons reading `cols` of `b` (N, n_in): (N, n, 2^k),
/// entry idx = Π_k (b_k if bit k of idx else 1 − b_k).
fn basis(b: &Tensor, cols: &[Tensor]) -> candle_core::Result<Tensor> {
    let mut basis: Vec<Tensor> = Vec::new();
    for c in cols {
        let x = b.index_select(c, 1)?;
        let nx = x.affine(-1.0, 1.0)?;
        basis = if basis.is_empty() {
            vec![nx, x]
        } else {
            let lo: Vec<Tensor> = basis.iter().map(|e| e.mul(&nx)).collect::<Result<_, _>>()?;
            let hi: Vec<Tensor> = basis.iter().map(|e| e.mul(&x)).collect::<Result<_, _>>()?;
            lo.into_iter().chain(hi).collect()
        };
    }
    Tensor::stack(&basis, 2)
}

impl Net {
    fn new(cfg: &TablesConfig, w: &Wiring, dev: &Device) -> candle_core::Result<Self> {
        // candle cannot seed its CPU generator, so initial values come from our own ChaCha8.
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let levels = ((1u32 << cfg.input_bits) - 1) as f32;
        let t0: Vec<f32> = (0..w.pixels * cfg.thresholds)
            .map(|i| {
                levels * ((i % cfg.thresholds) as f32 + 1.0) / (cfg.thresholds as f32 + 1.0) - 0.5
            })
            .collect();
        let groups = cfg.n2 / cfg.group_size;
        let score_max = cfg.score_max() as f64;
        let wg: Vec<[u32; FAN_IN]> = (0..groups)
            .map(|g| {
                std::array::from_fn(|k| (g * cfg.group_size + k.min(cfg.group_size - 1)) as u32)
            })
            .collect();
        Ok(Net {
            thresholds: Var::from_tensor(&Tensor::from_vec(t0, (w.pixels, cfg.thresholds), dev)?)?,
            t1: uniform(&mut rng, &[cfg.n1, 16], -1.0, 1.0, dev)?,
            t2: uniform(&mut rng, &[cfg.n2, 16], -1.0, 1.0, dev)?,
            scores: uniform(
                &mut rng,
                &[groups << cfg.group_size, w.classes],
                0.0,
                score_max as f32,
                dev,
            )?,
            log_temp: Var::from_tensor(&Tensor::new(
                -((score_max * (groups as f64).sqrt() / 2.0).ln() as f32),
                dev,
            )?)?,
            w1: columns(&w.l1, FAN_IN, dev)?,
            w2: columns(&w.l2, FAN_IN, dev)?,
            wg: columns(&wg, cfg.group_size, dev)?,
            groups,
            score_max,
        })
    }

    fn vars(&self) -> Vec<Var> {
        [
            &self.thresholds,
            &self.t1,
            &self.t2,
            &self.scores,
            &self.log_temp,
        ]
        .into_iter()
        .cloned()
        .collect()
    }

    /// Integer class scores: rounded in the forward pass, straight-through in training.
    fn quantized_scores(&self, train: bool) -> candle_core::Result<Tensor> {
        let c = self.scores.as_tensor().clamp(0f32, self.score_max as f32)?;
        let r = c.round()?.detach();
        if train {
            ste(&c, &r)
        } else {
            Ok(r)
        }
    }

    /// Layer-0 bits (N, pixels · thresholds) of integer pixels `x` (N, pixels).
    fn bits0(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let z = x
            .unsqueeze(2)?
            .broadcast_sub(&self.thresholds.as_tensor().unsqueeze(0)?)?;
        binarize(&z.flatten_from(1)?, TAU_THRESHOLD, train)
    }

    /// A hidden table layer: (N, n) bits.
    fn layer(
        &self,
        b: &Tensor,
        cols: &[Tensor],
        t: &Var,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let z = basis(b, cols)?
            .broadcast_mul(&t.as_tensor().unsqueeze(0)?)?
            .sum(2)?;
        binarize(&z, TAU_TABLE, train)
    }

    /// Logits (sums of integer scores in evaluation), before the temperature; `noise`
    /// (training only) flips bits at random with probability `flip`.
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        mut noise: Option<(&mut ChaCha8Rng, f64)>,
    ) -> candle_core::Result<Tensor> {
        let mut flip = |b: Tensor| match noise.as_mut() {
            Some((rng, p)) if *p > 0.0 => flip_bits(&b, *p, rng),
            _ => Ok(b),
        };
        let b0 = flip(self.bits0(x, train)?)?;
        let b1 = flip(self.layer(&b0, &self.w1, &self.t1, train)?)?;
        let b2 = flip(self.layer(&b1, &self.w2, &self.t2, train)?)?;
        let g = basis(&b2, &self.wg)?;
        let n = g.dim(0)?;
        let entries = self.groups * g.dim(2)?;
        g.reshape((n, entries))?
            .matmul(&self.quantized_scores(train)?)
    }

    /// The integer tables of the evaluation forward pass.
    fn tables(&self, cfg: &TablesConfig, classes: usize) -> candle_core::Result<Tables> {
        let levels = 1u32 << cfg.input_bits;
        let l0 = self
            .thresholds
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            // [x - t > 0] as the forward pass computes it: the same sign as x > t
            .map(|t| (0..levels).map(|v| u8::from(v as f32 - t > 0.0)).collect())
            .collect();
        let signs = |t: &Var| -> candle_core::Result<Vec<Vec<u8>>> {
            Ok(t.as_tensor()
                .to_vec2::<f32>()?
                .into_iter()
                .map(|row| row.into_iter().map(|v| u8::from(v > 0.0)).collect())
                .collect())
        };
        let q = self.quantized_scores(false)?.to_vec2::<f32>()?;
        let per = 1usize << cfg.group_size;
        let scores = q
            .chunks(per)
            .map(|rows| {
                rows.iter()
                    .flat_map(|r| r.iter().map(|&s| s as u8))
                    .collect()
            })
            .collect();
        debug_assert_eq!(q.len(), self.groups * per);
        debug_assert!(q.iter().all(|r| r.len() == classes));
        Ok(Tables {
            l0,
            l1: signs(&self.t1)?,
            l2: signs(&self.t2)?,
            scores,
        })
    }
}

/// Trains the network and exports it; `progress(epoch, mean loss)` after every epoch.
pub fn train(
    cfg: &TablesConfig,
    train: &Dataset,
    test: &Dataset,
    progress: &dyn Fn(usize, f32),
) -> Result<TablesReport, TrainError> {
    let started = Instant::now();
    cfg.check()?;
    let (shape, classes) = check_data(train, test)?;
    let wiring = Wiring::new(cfg, shape, classes)?;
    let spec = unit_input(shape, cfg.input_bits);
    let dev = Device::Cpu;
    let net = Net::new(cfg, &wiring, &dev).ctx("building the network")?;
    let flat = |ds: &Dataset| input_tensor(ds, &spec, &dev).and_then(|t| t.flatten_from(1));
    let x_train = flat(train).ctx("train inputs")?;
    let y_train = label_tensor(train, &dev)?;
    let x_test = flat(test).ctx("test inputs")?;
    let epochs = Epochs {
        learning_rate: cfg.learning_rate,
        batch_size: cfg.batch_size,
        epochs: cfg.epochs,
        seed: cfg.seed,
    };
    let final_loss = epochs.run(
        net.vars(),
        (&x_train, &y_train),
        progress,
        &mut |xb, rng| {
            net.forward(xb, true, Some((rng, cfg.flip)))
                .and_then(|l| l.broadcast_mul(&net.log_temp.as_tensor().exp()?))
        },
    )?;

    let logits = net
        .forward(&x_test, false, None)
        .and_then(|l| l.to_vec2::<f32>())
        .ctx("evaluating the test split")?;
    let predictions_float: Vec<usize> = logits
        .iter()
        .map(|l| fhecam_engine::reference::argmax(l))
        .collect();
    let tables = net.tables(cfg, classes).ctx("exporting the tables")?;
    let model = wiring.model(cfg, &spec, &tables);
    model.infer()?;
    let scores = Scores::measure(&model, test, predictions_float, final_loss, started)?;
    Ok(TablesReport {
        pbs_device_clear: planned_pbs(&model, InputMode::DeviceClear)?,
        pbs_encrypted: planned_pbs(&model, InputMode::Encrypted)?,
        model,
        config: cfg.clone(),
        scores,
    })
}
