//! Evaluation of a whole model graph with the circuits of `circuit.rs`, on any backend.

use super::backend::Backend;
use super::circuit::{digits_for, Acc, CircuitError, Digits, Engine, Val};
use crate::layer::{lut, ClearFrame};
use crate::model::{Kind, Model, ModelError, ValueInfo};
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
    /// A node whose input does not have the form its circuit reads (never for a model
    /// `Model::infer` accepted).
    #[error("{0}")]
    Input(String),
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
///
/// A secret-table layer (`lut`, `group_sum`) has `tables`, the owner-encrypted lookup
/// tables its PBS read in circuit order (`layer::lut::secret_tables`), and, when it reads
/// the frame, `clear_tables` holding every entry for the device to pick
/// (`layer::lut::clear_entries`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerParams<C, T> {
    pub weights: Vec<C>,
    pub bias: Vec<Vec<C>>,
    pub clear_tables: Vec<C>,
    #[serde(default)]
    pub tables: Vec<T>,
}

/// The clear contents of one secret-table PBS: `k` tables of 16 entries (many-LUT).
pub type ClearTable = Vec<[u64; 16]>;

impl<C, T> LayerParams<C, T> {
    /// The same parameters with other secret tables.
    pub fn with_tables<U>(self, tables: Vec<U>) -> LayerParams<C, U> {
        LayerParams {
            weights: self.weights,
            bias: self.bias,
            clear_tables: self.clear_tables,
            tables,
        }
    }

    /// The same parameters with `f` applied to every ciphertext and `g` to every secret
    /// table (stops at the first error).
    pub fn try_map_all<D, U, E>(
        &self,
        f: impl Fn(&C) -> Result<D, E>,
        g: impl Fn(&T) -> Result<U, E>,
    ) -> Result<LayerParams<D, U>, E> {
        Ok(LayerParams {
            tables: self.tables.iter().map(g).collect::<Result<_, _>>()?,
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
            match n.op.layer().clear_frame() {
                ClearFrame::PassesThrough | ClearFrame::Computes => clear[k + 1] = true,
                ClearFrame::Consumes => {}
                ClearFrame::Refuses => return None,
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
    clear.as_ref().is_some_and(|c| {
        c[model.nodes[k].inputs[0]]
            && model.nodes[k].op.layer().clear_frame() == ClearFrame::Consumes
    })
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

/// What one node's parameters must hold: (weight digits, biases, digits per bias, clear
/// entries, secret tables); `None` for nodes without parameters.
fn param_shape(model: &Model, clear: &Option<Vec<bool>>, k: usize) -> Option<[usize; 5]> {
    let op = &model.nodes[k].op;
    let rc = reads_clear(model, clear, k);
    if let Some(l) = op.linear() {
        let per = ClearTables::of(model.input.bits, l.weight_range).per_weight();
        return Some([
            l.weights.len() * weight_digits(l.weight_range),
            l.bias.len(),
            bias_digits(l.bias_range),
            if rc { l.weights.len() * per } else { 0 },
            0,
        ]);
    }
    let (tables, entries) = lut::param_counts(op)?;
    Some([0, 0, 0, if rc { entries } else { 0 }, tables])
}

/// Checks that `params[k]` is present exactly for nodes with parameters and has the right
/// sizes.
pub fn check_params<C, T>(
    model: &Model,
    params: &[Option<LayerParams<C, T>>],
) -> Result<(), EvalError> {
    if params.len() != model.nodes.len() {
        return Err(EvalError::Params(format!(
            "{} layers of parameters for {} nodes",
            params.len(),
            model.nodes.len()
        )));
    }
    let clear = clear_values(model);
    for (k, (node, p)) in model.nodes.iter().zip(params).enumerate() {
        match (param_shape(model, &clear, k), p) {
            (None, None) => {}
            (Some([nw, nb, nd, ntab, nsec]), Some(p))
                if p.weights.len() == nw
                    && p.bias.len() == nb
                    && p.bias.iter().all(|d| d.len() == nd)
                    && p.clear_tables.len() == ntab
                    && p.tables.len() == nsec => {}
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

#[derive(Clone)]
pub(crate) enum Tensor<C> {
    /// Each element as its base-4 digits, least significant first.
    Act(Vec<Vec<Val<C>>>),
    Acc(Vec<Acc<C>>),
    /// A secret-table layer's output: element `i` holds `place_i · v_i` in one block,
    /// ready to be summed into its consumers' indices.
    Scaled(Vec<Val<C>>),
    /// The frame as the device holds it, in the clear, and its bits per value.
    Clear(Vec<u8>, u8),
}

pub(crate) fn to_accs<C: Clone>(t: &Tensor<C>) -> Vec<Acc<C>> {
    match t {
        Tensor::Acc(a) => a.clone(),
        Tensor::Clear(..) => unreachable!("clear values only reach linear layers (clear_values)"),
        Tensor::Scaled(_) => unreachable!("lut outputs only reach secret-table layers (places)"),
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

/// What a layer's circuit reads: the engine, its inputs as ciphertext tensors with their
/// static types, its output's type and its encrypted parameters (linear layers).
pub(crate) struct Cx<'a, B: Backend> {
    pub e: &'a Engine<B>,
    pub inputs: Vec<&'a Tensor<B::Ct>>,
    pub infos: Vec<&'a ValueInfo>,
    pub out: &'a ValueInfo,
    pub params: Option<&'a LayerParams<B::Ct, B::Table>>,
    /// The multiplier every element of the output is read with by secret-table layers
    /// (`layer::lut::places`), when it feeds them.
    pub place: Option<&'a [u16]>,
}

impl<B: Backend> Cx<'_, B> {
    /// The layer's encrypted parameters (`check_params` made sure linear layers have them).
    pub fn params(&self) -> Result<&LayerParams<B::Ct, B::Table>, EvalError> {
        self.params
            .ok_or_else(|| EvalError::Input("encrypted parameters missing".into()))
    }
    /// What a linear layer reads: its input (an activation, encrypted or clear) with its
    /// type, and its encrypted weights and biases.
    #[allow(clippy::type_complexity)]
    pub fn linear_input(
        &self,
    ) -> Result<(&Tensor<B::Ct>, &ValueInfo, &LayerParams<B::Ct, B::Table>), EvalError> {
        let (t, ai, p) = (self.inputs[0], self.infos[0], self.params()?);
        if let Tensor::Acc(_) = t {
            return Err(EvalError::Input("reads an accumulator".into()));
        }
        Ok((t, ai, p))
    }
    /// The first input as activation digits, or why the layer cannot read it.
    pub fn act(&self) -> Result<&[Vec<Val<B::Ct>>], EvalError> {
        match self.inputs[0] {
            Tensor::Act(x) => Ok(x),
            Tensor::Acc(_) | Tensor::Clear(..) | Tensor::Scaled(_) => {
                Err(EvalError::Input("expects an encrypted activation".into()))
            }
        }
    }
}

/// A layer kind's encrypted evaluation, written once for every [`Backend`]; implemented
/// in the kind's own module beside its plaintext reference.
pub(crate) trait Circuit {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError>;
}

/// Runs the model on encrypted (or clear-modelled) inputs. Uses the current rayon pool:
/// output elements of a layer are independent and evaluated in parallel.
pub fn run<B: Backend>(
    e: &Engine<B>,
    model: &Model,
    params: &[Option<LayerParams<B::Ct, B::Table>>],
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
    params: &[Option<LayerParams<B::Ct, B::Table>>],
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
    params: &[Option<LayerParams<B::Ct, B::Table>>],
    first: Tensor<B::Ct>,
) -> Result<RunOutput<B::Ct>, EvalError> {
    let infos = model.infer()?;
    check_params(model, params)?;
    let places = lut::places(model, &infos)?;
    let mut vals: Vec<Tensor<B::Ct>> = vec![first];
    let mut pbs_per_node = Vec::with_capacity(model.nodes.len());
    for (k, node) in model.nodes.iter().enumerate() {
        let before = e.pbs_count();
        let cx = Cx {
            e,
            inputs: node.inputs.iter().map(|&v| &vals[v]).collect(),
            infos: node.inputs.iter().map(|&v| &infos[v]).collect(),
            out: &infos[k + 1],
            params: params[k].as_ref(),
            place: places[k + 1].as_deref(),
        };
        let out = crate::model::each_kind!(&node.op, l => l.circuit(&cx)).map_err(|e| match e {
            EvalError::Input(msg) => {
                EvalError::Input(format!("node {k} ({}): {msg}", node.op.name()))
            }
            e => e,
        })?;
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
pub(crate) fn linear<B: Backend>(
    e: &Engine<B>,
    taps: &[(usize, usize)],
    t: &Tensor<B::Ct>,
    ai: &ValueInfo,
    p: &LayerParams<B::Ct, B::Table>,
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
                Tensor::Acc(_) | Tensor::Scaled(_) => {
                    unreachable!("infer() and places() guarantee linear layers read activations")
                }
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
    p: &LayerParams<B::Ct, B::Table>,
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
    p: &LayerParams<B::Ct, B::Table>,
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
    let params = unit_params(model)?;
    let out = match mode {
        InputMode::Encrypted => run(&e, model, &params, vec![(); input_ciphertexts(model)])?,
        InputMode::DeviceClear => {
            run_device_clear(&e, model, &params, &vec![0; model.input.len()])?
        }
    };
    Ok((out.pbs_per_node.clone(), out.layout()))
}

/// Parameters built by calling `f(value)` on every stored digit (weight, bias and
/// clear-table digits, and secret-table entries), with the secret tables in the clear
/// (for planning, the clear backend and tests).
pub fn map_params<C>(
    model: &Model,
    f: &mut dyn FnMut(u64) -> C,
) -> Result<Vec<Option<LayerParams<C, ClearTable>>>, EvalError> {
    let f = std::cell::RefCell::new(f);
    map_params_with(model, &mut |v| (f.borrow_mut())(v), &mut |v| {
        (f.borrow_mut())(v)
    })
}

/// [`map_params`] with `entry(v)` for the entries a device-clear secret-table layer picks
/// (values up to 15, one block each; `f` gets base-4 digits).
pub fn map_params_with<C>(
    model: &Model,
    f: &mut dyn FnMut(u64) -> C,
    entry: &mut dyn FnMut(u64) -> C,
) -> Result<Vec<Option<LayerParams<C, ClearTable>>>, EvalError> {
    let infos = model.infer()?;
    let places = lut::places(model, &infos)?;
    let clear = clear_values(model);
    Ok(model
        .nodes
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let rc = reads_clear(model, &clear, k);
            if let Some(l) = n.op.linear() {
                return Some(linear_params(model.input.bits, &l, rc, f));
            }
            lut::param_counts(&n.op)?;
            let place = places[k + 1].as_deref();
            let entries = match rc {
                true => lut::clear_entries(&n.op, place),
                false => Vec::new(),
            };
            Some(LayerParams {
                weights: Vec::new(),
                bias: Vec::new(),
                clear_tables: entries.into_iter().map(&mut *entry).collect(),
                tables: lut::secret_tables(&n.op, place),
            })
        })
        .collect())
}

/// A linear layer's digits: weights, biases and (reading the clear frame) clear tables.
fn linear_params<C>(
    bits: u8,
    l: &crate::layer::Linear<'_>,
    reads_clear: bool,
    f: &mut dyn FnMut(u64) -> C,
) -> LayerParams<C, ClearTable> {
    let nd = bias_digits(l.bias_range);
    let wd = weight_digits(l.weight_range);
    let base = (l.weight_range[0] as i64).min(0);
    let clear_tables = if reads_clear {
        let t = ClearTables::of(bits, l.weight_range);
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
    LayerParams {
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
        tables: Vec::new(),
    }
}

fn unit_params(model: &Model) -> Result<Vec<Option<LayerParams<(), ()>>>, EvalError> {
    let params = map_params(model, &mut |_| ())?;
    let unit = |p: Option<LayerParams<(), ClearTable>>| {
        p.map(|p| {
            let n = p.tables.len();
            p.with_tables(vec![(); n])
        })
    };
    Ok(params.into_iter().map(unit).collect())
}
