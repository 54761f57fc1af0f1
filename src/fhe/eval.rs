//! Evaluation of a whole model graph with the circuits of `circuit.rs`, on any backend.

use super::backend::Backend;
use super::circuit::{digits_for, Acc, CircuitError, Digits, Engine, Val};
use crate::model::{Kind, Model, ModelError, Op, ValueInfo};
use crate::reference::{add_mul, for_each_tap, pool_windows};
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
}

/// Encrypted parameters of one linear layer: `weights[i * D + j]` holds base-4 digit `j`
/// (least significant first) of `w_i - base`, with `base = min(wmin, 0)` and
/// `D = weight_digits(weight_range)`, and `bias[o]` the base-4 digits of `b_o - bmin`.
/// Digit `j` stands for `u_j + c_j` with the clear `c_j` = minus digit `j` of `-base`, so
/// every digit product `(u_j + c_j)·x_k` spans at most 10 values and fits one PBS.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerParams<C> {
    pub weights: Vec<C>,
    pub bias: Vec<Vec<C>>,
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
    if params.len() != model.nodes.len() {
        return Err(EvalError::Params(format!(
            "{} layers of parameters for {} nodes",
            params.len(),
            model.nodes.len()
        )));
    }
    for (k, (node, p)) in model.nodes.iter().zip(params).enumerate() {
        let want = match &node.op {
            Op::Conv2d {
                weights,
                bias,
                weight_range,
                bias_range,
                ..
            }
            | Op::Dense {
                weights,
                bias,
                weight_range,
                bias_range,
                ..
            } => Some((
                weights.len() * weight_digits(*weight_range),
                bias.len(),
                bias_digits(*bias_range),
            )),
            _ => None,
        };
        match (want, p) {
            (None, None) => {}
            (Some((nw, nb, nd)), Some(p))
                if p.weights.len() == nw
                    && p.bias.len() == nb
                    && p.bias.iter().all(|d| d.len() == nd) => {}
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
}

fn to_accs<C: Clone>(t: &Tensor<C>) -> Vec<Acc<C>> {
    match t {
        Tensor::Acc(a) => a.clone(),
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
    let infos = model.infer()?;
    check_params(model, params)?;
    if input.len() != input_ciphertexts(model) {
        return Err(EvalError::InputLen {
            expected: input_ciphertexts(model),
            got: input.len(),
        });
    }
    let xmax = (1i64 << model.input.bits) - 1;
    let nd = input_value_digits(model);
    let mut it = input.into_iter();
    let mut vals: Vec<Tensor<B::Ct>> = vec![Tensor::Act(
        (0..model.input.len())
            .map(|_| {
                (0..nd)
                    .map(|k| e.fresh(it.next().unwrap(), 0, (xmax >> (2 * k)).min(3)))
                    .collect()
            })
            .collect(),
    )];
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
                Tensor::Act(x),
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
                        neuron(e, &taps, x, ai, p, oc, *weight_range, *bias_range)
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
                Tensor::Act(x),
            ) => {
                let p = params[k].as_ref().unwrap();
                let n = x.len();
                let accs = (0..*out_features)
                    .into_par_iter()
                    .map(|o| {
                        let taps: Vec<_> = (0..n).map(|i| (o * n + i, i)).collect();
                        neuron(e, &taps, x, ai, p, o, *weight_range, *bias_range)
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
fn neuron<B: Backend>(
    e: &Engine<B>,
    taps: &[(usize, usize)],
    x: &[Vec<Val<B::Ct>>],
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
            let u = e.fresh(p.weights[wi * wd + j].clone(), 0, (vmax >> (2 * j)).min(3));
            for (k, xk) in x[xi].iter().enumerate() {
                acc.push(j + k, e.product(&u, xk, c, pmin(j, k)));
            }
        }
    }
    acc.offset += shift * taps.len() as i64 + br[0] as i64;
    let brange = (br[1] as i64 - br[0] as i64) as u64;
    for (j, d) in p.bias[o].iter().enumerate() {
        let hi = ((brange >> (2 * j)) as i64).min(3);
        acc.push(j, e.fresh(d.clone(), 0, hi));
    }
    // the bias digits can never exceed the bias range as a whole
    acc.range = acc
        .range
        .min(((-shift + (wmax * xmax).max(0)) as u64) * taps.len() as u64 + brange);
    acc
}

/// Plans a run without keys: PBS per node, ciphertext x ciphertext MACs and output layout.
pub fn plan(model: &Model) -> Result<(Vec<u64>, OutputLayout), EvalError> {
    use super::backend::PlanBackend;
    let e = Engine::new(PlanBackend);
    let params = unit_params(model, &|| ())?;
    let out = run(&e, model, &params, vec![(); input_ciphertexts(model)])?;
    Ok((out.pbs_per_node.clone(), out.layout()))
}

/// Parameters built by calling `f(value)` on every stored digit (for planning and tests).
pub fn map_params<C>(
    model: &Model,
    f: &mut dyn FnMut(u64) -> C,
) -> Result<Vec<Option<LayerParams<C>>>, EvalError> {
    model.infer()?;
    Ok(model
        .nodes
        .iter()
        .map(|n| match &n.op {
            Op::Conv2d {
                weights,
                bias,
                weight_range,
                bias_range,
                ..
            }
            | Op::Dense {
                weights,
                bias,
                weight_range,
                bias_range,
                ..
            } => {
                let nd = bias_digits(*bias_range);
                let wd = weight_digits(*weight_range);
                let base = (weight_range[0] as i64).min(0);
                Some(LayerParams {
                    weights: weights
                        .iter()
                        .flat_map(|&w| {
                            let v = (w as i64 - base) as u64;
                            (0..wd).map(move |j| (v >> (2 * j)) & 3)
                        })
                        .map(&mut *f)
                        .collect(),
                    bias: bias
                        .iter()
                        .map(|&b| {
                            let v = (b as i64 - bias_range[0] as i64) as u64;
                            (0..nd).map(|j| f((v >> (2 * j)) & 3)).collect()
                        })
                        .collect(),
                })
            }
            _ => None,
        })
        .collect())
}

fn unit_params<C>(
    model: &Model,
    f: &dyn Fn() -> C,
) -> Result<Vec<Option<LayerParams<C>>>, EvalError> {
    map_params(model, &mut |_| f())
}
