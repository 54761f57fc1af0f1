//! Evaluation of a whole model graph with the circuits of `circuit.rs`, on any backend.

use super::backend::Backend;
use super::circuit::{digits_for, Acc, CircuitError, Digits, Engine, Val};
use super::geometry::{for_each_tap, pool_windows};
use crate::model::{Kind, Model, ModelError, Op, ValueInfo};
use crate::reference::add_mul;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Circuit(#[from] CircuitError),
    #[error("encrypted parameters do not match the architecture: {0}")]
    Params(String),
    #[error("expected {expected} input ciphertexts, got {got}")]
    InputLen { expected: usize, got: usize },
    #[error("device-clear input needs the frame to feed Conv2d or Dense layers directly (or through Flatten); this model pools or adds it first: use input_mode = \"encrypted\"")]
    DeviceClearUnsupported,
}

/// Encrypted parameters of one linear layer: `weights[i * D + j]` holds base-4 digit `j`
/// (least significant first) of `w_i - base`, with `base = min(wmin, 0)` and
/// `D = weight_digits(weight_range)`, and `bias[o]` the base-4 digits of `b_o - bmin`.
/// Digit `j` stands for `u_j + c_j` with the clear `c_j` = minus digit `j` of `-base`, so
/// every digit product `(u_j + c_j)·x_k` spans at most 10 values and fits one PBS.
///
/// A layer that reads the frame itself also has `clear_tables`, for cameras that keep the
/// frame in the clear ([`InputMode::DeviceClear`]): for weight `i`, chunk `c` of the input
/// value and its value `v`, `clear_tables[i * per_weight + start_c + v * digits_c + k]`
/// encrypts base-4 digit `k` of `w_i·v − pmin_c` (see [`ClearTables`]). The device picks
/// the digits of a whole product of weight and pixel without any PBS, and they carry as
/// cheaply as any digit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerParams<C> {
    pub weights: Vec<C>,
    pub bias: Vec<Vec<C>>,
    pub clear_tables: Vec<C>,
}

impl<C> LayerParams<C> {
    /// The same parameters with `f` applied to every ciphertext (stops at the first error).
    pub fn try_map<D, E>(&self, f: impl Fn(&C) -> Result<D, E>) -> Result<LayerParams<D>, E> {
        Ok(LayerParams {
            weights: self.weights.iter().map(&f).collect::<Result<_, _>>()?,
            bias: self
                .bias
                .iter()
                .map(|d| d.iter().map(&f).collect())
                .collect::<Result<_, _>>()?,
            clear_tables: self.clear_tables.iter().map(&f).collect::<Result<_, _>>()?,
        })
    }
}

/// How the camera feeds its frame to the encrypted network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputMode {
    /// The frame is encrypted with the owner's public key (the design's default).
    #[default]
    Encrypted,
    /// The frame stays in the clear on the device, which holds it anyway: clear pixel ×
    /// encrypted weight costs no PBS. Every value computed from it is still encrypted.
    DeviceClear,
}

impl InputMode {
    pub fn name(self) -> &'static str {
        match self {
            InputMode::Encrypted => "encrypted",
            InputMode::DeviceClear => "device-clear",
        }
    }
}

/// Which values are clear when the frame is: the input, and flattenings of it. `None` when
/// a clear value would reach anything but a Conv2d or Dense layer (or a Flatten).
fn clear_values(model: &Model) -> Option<Vec<bool>> {
    let mut clear = vec![false; model.nodes.len() + 1];
    clear[0] = true;
    for (k, n) in model.nodes.iter().enumerate() {
        if n.inputs.iter().skip(1).any(|&i| clear[i]) {
            return None;
        }
        if clear[n.inputs[0]] {
            match n.op {
                Op::Flatten => clear[k + 1] = true,
                Op::Conv2d { .. } | Op::Dense { .. } => {}
                _ => return None,
            }
        }
    }
    Some(clear)
}

/// Whether the model can run on a frame held in the clear, and why not.
pub fn check_device_clear(model: &Model) -> Result<(), EvalError> {
    clear_values(model)
        .map(|_| ())
        .ok_or(EvalError::DeviceClearUnsupported)
}

/// Whether node `k` reads the clear frame in device-clear mode (then it has clear tables).
fn reads_clear(model: &Model, clear: &Option<Vec<bool>>, k: usize) -> bool {
    clear
        .as_ref()
        .is_some_and(|c| c[model.nodes[k].inputs[0]] && model.nodes[k].op.is_linear())
}

/// Shape of a layer's clear tables. The frame's values are read in chunks of up to 4 bits,
/// least significant first (chunk `c` weighs 16^c); for a chunk value `v ∈ 0..=vmax`, a
/// product `w·v` is stored as the `digits` base-4 digits of `w·v − pmin ∈ 0..=range`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClearTables {
    pub chunks: Vec<Chunk>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chunk {
    pub vmax: i64,
    pub pmin: i64,
    pub range: i64,
    pub digits: usize,
    /// Index of this chunk's first entry among one weight's entries.
    pub start: usize,
}

impl ClearTables {
    /// For input values of `bits` bits and weights in `wr`.
    pub fn of(bits: u8, wr: [i8; 2]) -> Self {
        let (wlo, whi) = ((wr[0] as i64).min(0), (wr[1] as i64).max(0));
        let mut start = 0;
        let chunks = (0..bits.div_ceil(4))
            .map(|c| {
                let vmax = (1i64 << (bits - 4 * c).min(4)) - 1;
                let range = vmax * (whi - wlo);
                let ch = Chunk {
                    vmax,
                    pmin: vmax * wlo,
                    range,
                    digits: digits_for(range as u64),
                    start,
                };
                start += (vmax as usize + 1) * ch.digits;
                ch
            })
            .collect();
        ClearTables { chunks }
    }
    /// Entries per weight.
    pub fn per_weight(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| (c.vmax as usize + 1) * c.digits)
            .sum()
    }
}

/// How many base-4 digits encode a weight of a layer with this public range.
pub fn weight_digits(wr: [i8; 2]) -> usize {
    let base = (wr[0] as i64).min(0);
    digits_for((wr[1] as i64 - base) as u64).max(digits_for((-base) as u64))
}

/// The clear offset `c_j` of each weight digit: `Σ 4^j c_j = min(wmin, 0)`, `c_j ∈ -3..=0`.
fn weight_digit_offsets(wr: [i8; 2]) -> Vec<i64> {
    let neg = -(wr[0] as i64).min(0);
    (0..weight_digits(wr))
        .map(|j| -((neg >> (2 * j)) & 3))
        .collect()
}

/// How many base-4 digits hold an activation in `0..=max`.
pub fn act_digits(max: u8) -> usize {
    digits_for(max as u64)
}

/// Base-4 digits of one input value.
fn input_value_digits(model: &Model) -> usize {
    act_digits(((1u16 << model.input.bits) - 1) as u8)
}

/// Ciphertexts in an encrypted input: one per base-4 digit of every input value.
pub fn input_ciphertexts(model: &Model) -> usize {
    model.input.len() * input_value_digits(model)
}

/// Splits quantized input values into the base-4 digits the engine encrypts.
pub fn input_digits(model: &Model, input: &[u8]) -> Vec<u64> {
    let nd = input_value_digits(model);
    input
        .iter()
        .flat_map(|&v| (0..nd).map(move |k| ((v as u64) >> (2 * k)) & 3))
        .collect()
}

/// How many digits encode a bias of a layer with this public range.
pub fn bias_digits(br: [i32; 2]) -> usize {
    digits_for((br[1] as i64 - br[0] as i64) as u64)
}

/// Checks that `params[k]` is present exactly for linear nodes and has the right sizes.
pub fn check_params<C>(model: &Model, params: &[Option<LayerParams<C>>]) -> Result<(), EvalError> {
    crate::lut::refuse_fhe(model)?;
    if params.len() != model.nodes.len() {
        return Err(EvalError::Params(format!(
            "{} layers of parameters for {} nodes",
            params.len(),
            model.nodes.len()
        )));
    }
    let clear = clear_values(model);
    for (k, (node, p)) in model.nodes.iter().zip(params).enumerate() {
        let nt = |weights: usize, wr: [i8; 2]| {
            if reads_clear(model, &clear, k) {
                weights * ClearTables::of(model.input.bits, wr).per_weight()
            } else {
                0
            }
        };
        let want = node.op.linear().map(|l| {
            (
                l.weights.len() * weight_digits(l.weight_range),
                l.bias.len(),
                bias_digits(l.bias_range),
                nt(l.weights.len(), l.weight_range),
            )
        });
        match (want, p) {
            (None, None) => {}
            (Some((nw, nb, nd, ntab)), Some(p))
                if p.weights.len() == nw
                    && p.bias.len() == nb
                    && p.bias.iter().all(|d| d.len() == nd)
                    && p.clear_tables.len() == ntab => {}
            _ => {
                return Err(EvalError::Params(format!(
                    "node {k} ({}) parameters have the wrong shape",
                    node.op.name()
                )))
            }
        }
    }
    Ok(())
}

/// Layout of the output: logit `i` is `offset[i] + Σ_j 4^j digit[i][j]`, `digits[i]` digits
/// each, logit by logit, least significant digit first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputLayout {
    pub offsets: Vec<i64>,
    pub digits: Vec<usize>,
}

impl OutputLayout {
    pub fn ciphertexts(&self) -> usize {
        self.digits.iter().sum::<usize>()
    }
    /// Reassembles logits from decrypted digits (in the order `RunOutput::flatten` gives).
    pub fn logits(&self, digits: &[u64]) -> Vec<i64> {
        let mut it = digits.iter();
        self.offsets
            .iter()
            .zip(&self.digits)
            .map(|(&o, &n)| {
                o + (0..n)
                    .map(|j| ((*it.next().unwrap() & 3) as i64) << (2 * j))
                    .sum::<i64>()
            })
            .collect()
    }
}

enum Tensor<C> {
    /// Each element as its base-4 digits, least significant first.
    Act(Vec<Vec<Val<C>>>),
    Acc(Vec<Acc<C>>),
    /// The frame as the device holds it, in the clear, and its bits per value.
    Clear(Vec<u8>, u8),
}

fn to_accs<C: Clone>(t: &Tensor<C>) -> Vec<Acc<C>> {
    match t {
        Tensor::Acc(a) => a.clone(),
        Tensor::Clear(..) => unreachable!("clear values only reach linear layers (clear_values)"),
        Tensor::Act(v) => v
            .iter()
            .map(|x| {
                let mut a = Acc::zero();
                for (k, d) in x.iter().enumerate() {
                    a.push(k, d.clone());
                }
                a
            })
            .collect(),
    }
}

/// What one run produced, with the PBS spent per node; the last entry of `pbs_per_node`
/// is the output stage (carrying the logits into fresh digits the owner can decrypt).
pub struct RunOutput<C> {
    pub logits: Vec<Digits<C>>,
    pub pbs_per_node: Vec<u64>,
}

impl<C: Clone> RunOutput<C> {
    pub fn layout(&self) -> OutputLayout {
        OutputLayout {
            offsets: self.logits.iter().map(|d| d.offset).collect(),
            digits: self.logits.iter().map(|d| d.d.len()).collect(),
        }
    }
    /// All output ciphertexts: logit by logit, least significant digit first.
    pub fn flatten(self) -> Vec<C> {
        self.logits
            .into_iter()
            .flat_map(|d| d.d.into_iter().map(|v| v.ct))
            .collect()
    }
}

/// Runs the model on encrypted (or clear-modelled) inputs. Uses the current rayon pool:
/// output elements of a layer are independent and evaluated in parallel.
pub fn run<B: Backend>(
    e: &Engine<B>,
    model: &Model,
    params: &[Option<LayerParams<B::Ct>>],
    input: Vec<B::Ct>,
) -> Result<RunOutput<B::Ct>, EvalError> {
    model.infer()?;
    if input.len() != input_ciphertexts(model) {
        return Err(EvalError::InputLen {
            expected: input_ciphertexts(model),
            got: input.len(),
        });
    }
    let xmax = (1i64 << model.input.bits) - 1;
    let nd = input_value_digits(model);
    let mut it = input.into_iter();
    let first = Tensor::Act(
        (0..model.input.len())
            .map(|_| {
                (0..nd)
                    .map(|k| e.fresh(it.next().unwrap(), 0, (xmax >> (2 * k)).min(3)))
                    .collect()
            })
            .collect(),
    );
    run_from(e, model, params, first)
}

/// Runs the model on a frame the device holds in the clear ([`InputMode::DeviceClear`]):
/// the layers that read it pick encrypted products from their clear tables, with no PBS.
pub fn run_device_clear<B: Backend>(
    e: &Engine<B>,
    model: &Model,
    params: &[Option<LayerParams<B::Ct>>],
    input: &[u8],
) -> Result<RunOutput<B::Ct>, EvalError> {
    model.infer()?;
    check_device_clear(model)?;
    if input.len() != model.input.len() {
        return Err(EvalError::InputLen {
            expected: model.input.len(),
            got: input.len(),
        });
    }
    let max = ((1u16 << model.input.bits) - 1) as u8;
    let first = Tensor::Clear(
        input.iter().map(|&v| v.min(max)).collect(),
        model.input.bits,
    );
    run_from(e, model, params, first)
}

fn run_from<B: Backend>(
    e: &Engine<B>,
    model: &Model,
    params: &[Option<LayerParams<B::Ct>>],
    first: Tensor<B::Ct>,
) -> Result<RunOutput<B::Ct>, EvalError> {
    let infos = model.infer()?;
    check_params(model, params)?;
    let mut vals: Vec<Tensor<B::Ct>> = vec![first];
    let mut pbs_per_node = Vec::with_capacity(model.nodes.len());
    for (k, node) in model.nodes.iter().enumerate() {
        let before = e.pbs_count();
        let ai = &infos[node.inputs[0]];
        let out = match (&node.op, &vals[node.inputs[0]]) {
            (
                Op::Conv2d {
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    weight_range,
                    bias_range,
                    ..
                },
                t @ (Tensor::Act(_) | Tensor::Clear(..)),
            ) => {
                let p = params[k].as_ref().unwrap();
                let [c, h, w] = ai.shape;
                let o = &infos[k + 1];
                let (oh, ow) = (o.shape[1], o.shape[2]);
                let accs = (0..out_channels * oh * ow)
                    .into_par_iter()
                    .map(|idx| {
                        let (oc, oy, ox) = (idx / (oh * ow), (idx / ow) % oh, idx % ow);
                        let mut taps = Vec::new();
                        for_each_tap(
                            c,
                            h,
                            w,
                            *kernel,
                            *stride,
                            *padding,
                            oy,
                            ox,
                            |ic, ky, kx, i| {
                                taps.push((((oc * c + ic) * kernel[0] + ky) * kernel[1] + kx, i));
                            },
                        );
                        linear(e, &taps, t, ai, p, oc, *weight_range, *bias_range)
                    })
                    .collect();
                Tensor::Acc(accs)
            }
            (
                Op::Dense {
                    out_features,
                    weight_range,
                    bias_range,
                    ..
                },
                t @ (Tensor::Act(_) | Tensor::Clear(..)),
            ) => {
                let p = params[k].as_ref().unwrap();
                let n = ai.len();
                let accs = (0..*out_features)
                    .into_par_iter()
                    .map(|o| {
                        let taps: Vec<_> = (0..n).map(|i| (o * n + i, i)).collect();
                        linear(e, &taps, t, ai, p, o, *weight_range, *bias_range)
                    })
                    .collect();
                Tensor::Acc(accs)
            }
            (Op::SumPool { kernel, stride }, t) => {
                let accs = to_accs(t);
                Tensor::Acc(
                    pool_windows(ai, *kernel, *stride)
                        .into_iter()
                        .map(|win| {
                            win.iter()
                                .fold(Acc::zero(), |s, &i| s.merge(accs[i].clone()))
                        })
                        .collect(),
                )
            }
            (Op::MaxPool { kernel, stride }, Tensor::Act(x)) => {
                let wins = pool_windows(ai, *kernel, *stride);
                Tensor::Act(
                    wins.into_par_iter()
                        .map(|win| {
                            // balanced tree: keeps the refresh-free path (variance) likely
                            let mut layer: Vec<Vec<Val<B::Ct>>> =
                                win.iter().map(|&i| x[i].clone()).collect();
                            while layer.len() > 1 {
                                layer = layer
                                    .chunks(2)
                                    .map(|p| match p {
                                        [a, b] if a.len() == 1 => vec![e.max(&a[0], &b[0])],
                                        [a, b] => {
                                            let bit = e.greater(a, b);
                                            e.select(&bit, a, b)
                                        }
                                        _ => p[0].clone(),
                                    })
                                    .collect();
                            }
                            layer.pop().unwrap()
                        })
                        .collect(),
                )
            }
            (Op::Activation { tables, .. }, t) => {
                let accs = to_accs(t);
                let Kind::Act { max } = infos[k + 1].kind else {
                    unreachable!("an activation's output is an activation")
                };
                let out_digits = act_digits(max);
                let ys: Result<Vec<_>, CircuitError> = accs
                    .into_par_iter()
                    .enumerate()
                    .map(|(i, acc)| {
                        let tab = &tables[if tables.len() == 1 {
                            0
                        } else {
                            ai.channel_of(i)
                        }];
                        e.apply_table_digits(
                            acc,
                            &|s| tab.lookup(s) as i64,
                            out_digits,
                            Some((tab.min, tab.min + tab.values.len() as i64 - 1)),
                        )
                    })
                    .collect();
                Tensor::Act(ys?)
            }
            (Op::Add { mul }, a) => {
                let (a, b) = (to_accs(a), to_accs(&vals[node.inputs[1]]));
                let bi = &infos[node.inputs[1]];
                Tensor::Acc(
                    a.into_iter()
                        .zip(b)
                        .enumerate()
                        .map(|(i, (x, y))| x.merge(y.times(add_mul(mul, bi, i) as u64)))
                        .collect(),
                )
            }
            (Op::Flatten, Tensor::Act(x)) => Tensor::Act(x.clone()),
            (Op::Flatten, Tensor::Clear(x, b)) => Tensor::Clear(x.clone(), *b),
            (Op::Flatten, Tensor::Acc(x)) => Tensor::Acc(x.clone()),
            // infer() guarantees linear layers and max pooling read activations
            _ => unreachable!("node kinds checked by Model::infer"),
        };
        pbs_per_node.push(e.pbs_count() - before);
        vals.push(out);
    }
    let before = e.pbs_count();
    // The owner decrypts the logits and takes the argmax: the camera only carries them
    // into digits that list compression can pack.
    let logits: Vec<Digits<B::Ct>> = to_accs(vals.last().unwrap())
        .into_par_iter()
        .map(|a| e.normalize_fresh(a))
        .collect();
    pbs_per_node.push(e.pbs_count() - before);
    Ok(RunOutput {
        logits,
        pbs_per_node,
    })
}

#[allow(clippy::too_many_arguments)]
fn linear<B: Backend>(
    e: &Engine<B>,
    taps: &[(usize, usize)],
    t: &Tensor<B::Ct>,
    ai: &ValueInfo,
    p: &LayerParams<B::Ct>,
    o: usize,
    wr: [i8; 2],
    br: [i32; 2],
) -> Acc<B::Ct> {
    let Kind::Act { max } = ai.kind else {
        unreachable!()
    };
    let (wmax, xmax) = (wr[1] as i64, max as i64);
    let vmax = wmax - (wr[0] as i64).min(0);
    let cs = weight_digit_offsets(wr);
    let wd = cs.len();
    // w·x = Σ_j Σ_k 4^(j+k) (u_j + c_j) x_k; each product is shifted by its lower bound
    // (c_j · max x_k) to stay non-negative, and the shifts are returned through the offset.
    let xd_hi: Vec<i64> = (0..act_digits(max))
        .map(|k| (xmax >> (2 * k)).min(3))
        .collect();
    let pmin = |j: usize, k: usize| (cs[j] * xd_hi[k]).min(0);
    let shift: i64 = (0..wd)
        .flat_map(|j| (0..xd_hi.len()).map(move |k| (j, k)))
        .map(|(j, k)| pmin(j, k) << (2 * (j + k)))
        .sum();
    let mut acc = Acc::zero();
    for &(wi, xi) in taps {
        for (j, &c) in cs.iter().enumerate() {
            let uhi = (vmax >> (2 * j)).min(3);
            match t {
                Tensor::Act(x) => {
                    let u = e.fresh(p.weights[wi * wd + j].clone(), 0, uhi);
                    for (k, xk) in x[xi].iter().enumerate() {
                        acc.push(j + k, e.product(&u, xk, c, pmin(j, k)));
                    }
                }
                Tensor::Clear(x, bits) => {
                    return linear_clear(e, taps, x, *bits, p, o, wr, br);
                }
                Tensor::Acc(_) => unreachable!("infer() guarantees linear layers read activations"),
            }
        }
    }
    acc.offset += shift * taps.len() as i64;
    let per_tap = (-shift + (wmax * xmax).max(0)) as u64;
    add_bias(e, acc, p, o, br, per_tap * taps.len() as u64)
}

/// [`linear`] on the frame the device holds in the clear: each chunk value `v` of its own
/// pixel picks the digits of `w·v − pmin` from the clear tables, fresh encryptions, with no
/// PBS. Their bounds are public, so the circuit is the same for every frame.
#[allow(clippy::too_many_arguments)]
fn linear_clear<B: Backend>(
    e: &Engine<B>,
    taps: &[(usize, usize)],
    x: &[u8],
    bits: u8,
    p: &LayerParams<B::Ct>,
    o: usize,
    wr: [i8; 2],
    br: [i32; 2],
) -> Acc<B::Ct> {
    let t = ClearTables::of(bits, wr);
    let per = t.per_weight();
    let mut acc = Acc::zero();
    for &(wi, xi) in taps {
        for (c, ch) in t.chunks.iter().enumerate() {
            let v = (x[xi] as usize >> (4 * c)) & ch.vmax as usize;
            for k in 0..ch.digits {
                let ct = p.clear_tables[wi * per + ch.start + v * ch.digits + k].clone();
                acc.push(2 * c + k, e.fresh(ct, 0, (ch.range >> (2 * k)).min(3)));
            }
        }
    }
    // chunk c weighs 16^c
    let (pmin, bound) = t.chunks.iter().enumerate().fold((0, 0), |(p, b), (c, ch)| {
        (p + (ch.pmin << (4 * c)), b + (ch.range << (4 * c)))
    });
    acc.offset += pmin * taps.len() as i64;
    add_bias(e, acc, p, o, br, bound as u64 * taps.len() as u64)
}

/// Adds neuron `o`'s encrypted bias digits; `bound` is what the products can sum to.
fn add_bias<B: Backend>(
    e: &Engine<B>,
    mut acc: Acc<B::Ct>,
    p: &LayerParams<B::Ct>,
    o: usize,
    br: [i32; 2],
    bound: u64,
) -> Acc<B::Ct> {
    acc.offset += br[0] as i64;
    let brange = (br[1] as i64 - br[0] as i64) as u64;
    for (j, d) in p.bias[o].iter().enumerate() {
        let hi = ((brange >> (2 * j)) as i64).min(3);
        acc.push(j, e.fresh(d.clone(), 0, hi));
    }
    // the bias digits can never exceed the bias range as a whole
    acc.range = acc.range.min(bound + brange);
    acc
}

/// Plans a run without keys: PBS per node and output layout, for encrypted input.
pub fn plan(model: &Model) -> Result<(Vec<u64>, OutputLayout), EvalError> {
    plan_mode(model, InputMode::Encrypted)
}

/// [`plan`] for either input mode (the circuit never depends on the frame's values).
pub fn plan_mode(model: &Model, mode: InputMode) -> Result<(Vec<u64>, OutputLayout), EvalError> {
    use super::backend::PlanBackend;
    let e = Engine::new(PlanBackend);
    let params = unit_params(model, &|| ())?;
    let out = match mode {
        InputMode::Encrypted => run(&e, model, &params, vec![(); input_ciphertexts(model)])?,
        InputMode::DeviceClear => {
            run_device_clear(&e, model, &params, &vec![0; model.input.len()])?
        }
    };
    Ok((out.pbs_per_node.clone(), out.layout()))
}

/// Parameters built by calling `f(value)` on every stored digit: weight, bias and
/// clear-table digits (for encryption, planning and tests).
pub fn map_params<C>(
    model: &Model,
    f: &mut dyn FnMut(u64) -> C,
) -> Result<Vec<Option<LayerParams<C>>>, EvalError> {
    model.infer()?;
    crate::lut::refuse_fhe(model)?;
    let clear = clear_values(model);
    Ok(model
        .nodes
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let l = n.op.linear()?;
            let nd = bias_digits(l.bias_range);
            let wd = weight_digits(l.weight_range);
            let base = (l.weight_range[0] as i64).min(0);
            let clear_tables = if reads_clear(model, &clear, k) {
                let t = ClearTables::of(model.input.bits, l.weight_range);
                l.weights
                    .iter()
                    .flat_map(|&w| {
                        t.chunks.clone().into_iter().flat_map(move |ch| {
                            (0..=ch.vmax).flat_map(move |v| {
                                let e = w as i64 * v - ch.pmin;
                                (0..ch.digits).map(move |k| ((e >> (2 * k)) & 3) as u64)
                            })
                        })
                    })
                    .map(&mut *f)
                    .collect()
            } else {
                Vec::new()
            };
            Some(LayerParams {
                weights: l
                    .weights
                    .iter()
                    .flat_map(|&w| {
                        let v = (w as i64 - base) as u64;
                        (0..wd).map(move |j| (v >> (2 * j)) & 3)
                    })
                    .map(&mut *f)
                    .collect(),
                bias: l
                    .bias
                    .iter()
                    .map(|&b| {
                        let v = (b as i64 - l.bias_range[0] as i64) as u64;
                        (0..nd).map(|j| f((v >> (2 * j)) & 3)).collect()
                    })
                    .collect(),
                clear_tables,
            })
        })
        .collect())
}

fn unit_params<C>(
    model: &Model,
    f: &dyn Fn() -> C,
) -> Result<Vec<Option<LayerParams<C>>>, EvalError> {
    map_params(model, &mut |_| f())
}
