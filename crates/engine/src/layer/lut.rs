//! Secret-table layers: every neuron is one lookup table the owner encrypts, read at an
//! index that is a public clear combination of at most four small inputs.
//!
//! - [`Lut`]: neuron `n` outputs `table[Σ_k mul[k]·x[inputs[k]]]`, an activation in
//!   `0..=out_max`;
//! - [`GroupSum`]: the class scores, `logits[c] = Σ_g table_g[idx_g·classes + c]`.
//!
//! Under FHE the index of a neuron is a leveled sum of fresh ciphertexts (no PBS) and its
//! table is one PBS whose accumulator the owner encrypted (`Backend::secret_lut`). A value
//! that feeds a secret-table layer is produced already multiplied by the one multiplier its
//! consumers read it with (its *place*), so the index sums fresh ciphertexts with
//! coefficient 1: `b1 + 2·b2 + 4·b3 + 8·b4` of fresh ciphertexts would carry variance 85,
//! over the parameters' budget of 25; four pre-scaled outputs carry 4·SECRET_VAR.

use serde::{Deserialize, Serialize};

use super::{act_max, ClearFrame, Layer};
use crate::fhe::backend::{Backend, BLOCK};
use crate::fhe::circuit::{Acc, Engine, Val, NOISE_BUDGET};
use crate::fhe::eval::{act_digits, Circuit, Cx, EvalError, Tensor};
use crate::model::{Kind, Model, ModelError, Op, ValueInfo};
use rayon::prelude::*;

/// Most inputs a neuron reads (4 binary inputs, or two 2-bit inputs: one 4-bit block).
pub const MAX_FAN_IN: usize = 4;
/// Most neurons (or groups) in one layer.
pub const MAX_NEURONS: usize = 1 << 16;
/// Noise variance of a secret-table PBS output, in units of a fresh ciphertext's: twice
/// what `fhecam bench --table-noise 10000` measured (a ratio of 0.97 to a clear table's;
/// docs/DESIGN.md, "Secret tables").
pub const SECRET_VAR: u64 = 2;

/// One neuron (or one output group): `table[Σ_k mul[k]·x[inputs[k]]]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LutNeuron {
    /// Elements of the layer's (flat) input value.
    pub inputs: Vec<u32>,
    /// The public clear multiplier of each input in the index.
    pub mul: Vec<u16>,
    /// One entry per index value (`GroupSum`: `classes` entries per index value).
    pub table: Vec<u8>,
}

/// A layer of secret tables; its output is a flat activation of one value per neuron.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lut {
    pub out_max: u8,
    pub neurons: Vec<LutNeuron>,
    /// Tables the owner published with the bundle (`fhecam protect
    /// --publish-frame-tables`): a camera holding the frame in the clear evaluates them in
    /// the clear, so the next layer's index is clear too and it picks its entries; with an
    /// encrypted frame each neuron is one PBS with a clear table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
}

/// Marks the `lut` layers that read the frame as published; returns how many.
pub fn publish_frame_tables(model: &mut Model) -> usize {
    let frame_luts = model.nodes.iter_mut().filter(|n| n.inputs == [0]);
    let mut published = 0;
    for node in frame_luts {
        if let Op::Lut(l) = &mut node.op {
            l.public = true;
            published += 1;
        }
    }
    published
}

/// The output layer: each group's secret tables give one score per class, summed per class
/// into the logits (an accumulator the agent decrypts).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSum {
    pub classes: usize,
    pub score_max: u8,
    pub groups: Vec<LutNeuron>,
}

impl LutNeuron {
    /// The index for input values `x` (the caller checked the wiring).
    pub fn index(&self, x: &[i64]) -> usize {
        let terms = self.inputs.iter().zip(&self.mul);
        terms.map(|(&i, &m)| m as i64 * x[i as usize]).sum::<i64>() as usize
    }

    /// Number of index values: `Σ mul·max + 1`.
    fn span(&self, x_max: u8) -> usize {
        self.mul
            .iter()
            .map(|&m| m as usize * x_max as usize)
            .sum::<usize>()
            + 1
    }

    /// Wiring, index range and entries, against an input of `len` values in `0..=x_max`.
    fn check(&self, len: usize, x_max: u8, per_index: usize, top: u8) -> Result<(), String> {
        if self.inputs.is_empty() || self.inputs.len() > MAX_FAN_IN {
            return Err(format!(
                "reads {} inputs; a secret table reads 1..={MAX_FAN_IN}",
                self.inputs.len()
            ));
        }
        if self.mul.len() != self.inputs.len() || self.mul.contains(&0) {
            return Err(format!(
                "needs one positive multiplier per input ({} inputs, mul {:?})",
                self.inputs.len(),
                self.mul
            ));
        }
        if let Some(i) = self.inputs.iter().find(|&&i| i as usize >= len) {
            return Err(format!(
                "input {i} is out of range (the input has {len} values)"
            ));
        }
        let span = self.span(x_max);
        if span > BLOCK as usize {
            return Err(format!(
                "index spans {span} values; a secret table indexes one 4-bit block (16)"
            ));
        }
        if self.table.len() != span * per_index {
            return Err(format!(
                "table has {} entries; the index spans {span} values, so it needs {}",
                self.table.len(),
                span * per_index
            ));
        }
        if let Some(v) = self.table.iter().find(|&&v| v > top) {
            return Err(format!("table entry {v} exceeds {top}"));
        }
        Ok(())
    }
}

fn check_count(n: usize, what: &str) -> Result<(), String> {
    if n == 0 || n > MAX_NEURONS {
        return Err(format!("needs 1..={MAX_NEURONS} {what}, got {n}"));
    }
    Ok(())
}

/// Checks every neuron (or group) of a layer against its input `a` in `0..=x_max`.
fn check_each(
    neurons: &[LutNeuron],
    noun: &str,
    (a, x_max): (&ValueInfo, u8),
    per_index: usize,
    top: u8,
) -> Result<(), String> {
    for (n, neuron) in neurons.iter().enumerate() {
        neuron
            .check(a.len(), x_max, per_index, top)
            .map_err(|e| format!("{noun} {n}: {e}"))?;
    }
    Ok(())
}

impl Layer for Lut {
    fn name(&self) -> &'static str {
        "lut"
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let (a, top) = (inputs[0], self.out_max);
        let x_max = act_max(a)?;
        check_count(self.neurons.len(), "neurons")?;
        if top == 0 || top as u64 >= BLOCK {
            return Err(format!("out_max must be 1..=15, got {top}"));
        }
        check_each(&self.neurons, "neuron", (a, x_max), 1, top)?;
        Ok(ValueInfo {
            shape: [self.neurons.len(), 1, 1],
            flat: true,
            kind: Kind::Act { max: top },
        })
    }

    fn strip(&mut self) {
        if !self.public {
            self.neurons.iter_mut().for_each(|n| n.table.fill(0));
        }
    }

    fn reference(&self, inputs: &[&[i64]], _infos: &[&ValueInfo]) -> Vec<i64> {
        let x = inputs[0];
        let out = |n: &LutNeuron| n.table[n.index(x)] as i64;
        self.neurons.iter().map(out).collect()
    }

    fn clear_frame(&self) -> ClearFrame {
        match self.public {
            true => ClearFrame::Computes,
            false => ClearFrame::Consumes,
        }
    }
}

impl Layer for GroupSum {
    fn name(&self) -> &'static str {
        "group_sum"
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let (a, top) = (inputs[0], self.score_max);
        let x_max = act_max(a)?;
        check_count(self.groups.len(), "groups")?;
        if !(2..=4096).contains(&self.classes) {
            return Err(format!("classes must be 2..=4096, got {}", self.classes));
        }
        if top as u64 >= BLOCK {
            return Err(format!("score_max must be 0..=15, got {top}"));
        }
        check_each(&self.groups, "group", (a, x_max), self.classes, top)?;
        Ok(ValueInfo {
            shape: [self.classes, 1, 1],
            flat: true,
            kind: Kind::Acc {
                lo: 0,
                hi: self.groups.len() as i64 * top as i64,
            },
        })
    }

    fn strip(&mut self) {
        self.groups.iter_mut().for_each(|g| g.table.fill(0));
    }

    fn reference(&self, inputs: &[&[i64]], _infos: &[&ValueInfo]) -> Vec<i64> {
        let x = inputs[0];
        let mut logits = vec![0i64; self.classes];
        for g in &self.groups {
            let row = g.index(x) * self.classes;
            for (c, l) in logits.iter_mut().enumerate() {
                *l += g.table[row + c] as i64;
            }
        }
        logits
    }

    fn clear_frame(&self) -> ClearFrame {
        ClearFrame::Consumes
    }
}

/// A secret-table node, whatever its kind: the one place that sorts `Op`'s arms into the
/// kinds made of secret tables and the others.
enum TableLayer<'a> {
    Lut(&'a Lut),
    GroupSum(&'a GroupSum),
}

impl<'a> TableLayer<'a> {
    fn of(op: &'a Op) -> Option<Self> {
        match op {
            Op::Lut(l) => Some(TableLayer::Lut(l)),
            Op::GroupSum(g) => Some(TableLayer::GroupSum(g)),
            Op::Conv2d(_)
            | Op::Dense(_)
            | Op::SumPool(_)
            | Op::MaxPool(_)
            | Op::Activation(_)
            | Op::Add(_)
            | Op::Flatten(_) => None,
        }
    }
}

/// The neurons of a secret-table node, whatever its kind.
fn neurons(op: &Op) -> Option<&[LutNeuron]> {
    match TableLayer::of(op)? {
        TableLayer::Lut(l) => Some(&l.neurons),
        TableLayer::GroupSum(g) => Some(&g.groups),
    }
}

/// The *place* of every element of every value: the one multiplier the secret-table
/// layers read it with, 0 for an element no layer reads (its neuron is never evaluated);
/// `None` for values no such layer reads, and for the frame, which arrives as digits. Refuses a wiring the circuit cannot evaluate within the noise
/// budget: an element read with two multipliers, a `lut` output read by another kind of
/// layer, or an index over the noise budget.
pub fn places(model: &Model, infos: &[ValueInfo]) -> Result<Vec<Option<Vec<u16>>>, ModelError> {
    let mut places: Vec<Option<Vec<u16>>> = vec![None; infos.len()];
    for (k, node) in model.nodes.iter().enumerate() {
        let err = |msg: String| ModelError::Node {
            node: k,
            op: node.op.name(),
            msg,
        };
        let produced_by_lut = |v: usize| v > 0 && matches!(model.nodes[v - 1].op, Op::Lut(_));
        let Some(ns) = neurons(&node.op) else {
            if let Some(&v) = node.inputs.iter().find(|&&v| produced_by_lut(v)) {
                return Err(err(format!(
                    "reads value {v}, the output of a lut layer: only lut and group_sum layers may read it"
                )));
            }
            continue;
        };
        let v = node.inputs[0];
        if !produced_by_lut(v) {
            // digits of an activation: Σ (mul·4^j)² fresh variances
            let digits = act_digits(match infos[v].kind {
                Kind::Act { max } => max,
                Kind::Acc { .. } => 0,
            });
            let per = |m: u16| {
                (0..digits)
                    .map(move |j| (m as u64) << (2 * j))
                    .map(|c| c * c)
            };
            for (n, neuron) in ns.iter().enumerate() {
                let var: u64 = neuron.mul.iter().flat_map(|&m| per(m)).sum();
                if var > NOISE_BUDGET {
                    return Err(err(format!(
                        "neuron {n}: its index weighs its inputs' digits by {:?}: noise variance {var} is over the budget of {NOISE_BUDGET} (read values of at most 4 bits with multiplier 1, or 2-bit values with multipliers 1 and 4)",
                        neuron.mul
                    )));
                }
            }
            continue;
        }
        let place = places[v].get_or_insert_with(|| vec![0; infos[v].len()]);
        for (n, neuron) in ns.iter().enumerate() {
            for (&i, &m) in neuron.inputs.iter().zip(&neuron.mul) {
                let p = &mut place[i as usize];
                if *p != 0 && *p != m {
                    return Err(err(format!(
                        "neuron {n} reads element {i} of value {v} with multiplier {m}, another neuron with {}: every element of a lut output is read with one multiplier",
                        *p
                    )));
                }
                *p = m;
            }
        }
    }
    for (v, place) in places.iter_mut().enumerate() {
        if let (Some(p), Kind::Act { max }) = (place.as_mut(), infos[v].kind) {
            for m in p.iter() {
                if *m as u64 * max as u64 >= BLOCK {
                    return Err(ModelError::Node {
                        node: v - 1,
                        op: "lut",
                        msg: format!("an output read with multiplier {m} exceeds one block"),
                    });
                }
            }
        }
    }
    Ok(places)
}

/// The clear contents of the secret tables a node's circuit reads, in the order it reads
/// them: one table of 16 entries per neuron (`lut`, already multiplied by the output's
/// place), or `classes` tables per group packed `per_pbs(span)` to a PBS (`group_sum`).
pub fn secret_tables(op: &Op, place: Option<&[u16]>) -> Vec<Vec<[u64; BLOCK as usize]>> {
    let one = |t: &dyn Fn(usize) -> u64, span: usize| {
        let mut out = [0u64; BLOCK as usize];
        for (i, o) in out.iter_mut().enumerate().take(span) {
            *o = t(i);
        }
        out
    };
    match TableLayer::of(op) {
        Some(TableLayer::Lut(l)) => l
            .neurons
            .iter()
            .enumerate()
            .map(|(n, neuron)| {
                let m = place.map_or(1, |p| p[n]) as u64;
                vec![one(&|i| m * neuron.table[i] as u64, neuron.table.len())]
            })
            .collect(),
        Some(TableLayer::GroupSum(g)) => g
            .groups
            .iter()
            .flat_map(|group| {
                let span = group.table.len() / g.classes;
                let per = per_pbs(span);
                let tables: Vec<_> = (0..g.classes)
                    .map(|c| one(&|i| group.table[i * g.classes + c] as u64, span))
                    .collect();
                tables
                    .chunks(per)
                    .map(|c| {
                        let mut c = c.to_vec();
                        // a short last chunk still takes a whole PBS of `per` tables
                        c.resize(per, [0; BLOCK as usize]);
                        c
                    })
                    .collect::<Vec<_>>()
            })
            .collect(),
        None => Vec::new(),
    }
}

/// (secret tables, clear entries) a secret-table node's parameters hold; `None` for other
/// kinds. Entries are only stored for a node that reads the frame (device-clear input).
pub fn param_counts(op: &Op) -> Option<(usize, usize)> {
    match TableLayer::of(op)? {
        TableLayer::Lut(l) if l.public => None,
        TableLayer::Lut(l) => Some((l.neurons.len(), l.neurons.len() * BLOCK as usize)),
        TableLayer::GroupSum(g) => {
            let per_group = |n: &LutNeuron| g.classes.div_ceil(per_pbs(n.table.len() / g.classes));
            let tables = g.groups.iter().map(per_group).sum();
            Some((tables, g.groups.len() * BLOCK as usize * g.classes))
        }
    }
}

/// How many tables share one PBS for an index of `span` values (many-LUT: 16 / k values).
pub fn per_pbs(span: usize) -> usize {
    match span {
        0..=4 => 4,
        5..=8 => 2,
        _ => 1,
    }
}

/// The encrypted index of one neuron (no PBS), from a pre-scaled lut output or from the
/// digits of an activation.
fn index<B: Backend>(
    e: &Engine<B>,
    t: &Tensor<B::Ct>,
    n: &LutNeuron,
) -> Result<Val<B::Ct>, EvalError> {
    let mut acc: Option<Val<B::Ct>> = None;
    let mut add = |v: Val<B::Ct>| {
        acc = Some(match acc.take() {
            None => v,
            Some(a) => e.add(a, &v),
        })
    };
    for (&i, &m) in n.inputs.iter().zip(&n.mul) {
        match t {
            Tensor::Scaled(x) => add(x[i as usize].clone()),
            Tensor::Act(x) => {
                for (j, d) in x[i as usize].iter().enumerate() {
                    add(e.scale(d.clone(), (m as u64) << (2 * j)));
                }
            }
            Tensor::Acc(_) | Tensor::Clear(..) => {
                return Err(EvalError::Input("a secret table reads activations".into()))
            }
        }
    }
    acc.ok_or_else(|| EvalError::Input("a neuron without inputs".into()))
}

/// One neuron's tables on its index: secret-table PBS, `per` tables each.
fn lookups<B: Backend>(
    e: &Engine<B>,
    idx: &Val<B::Ct>,
    tables: &[B::Table],
    per: usize,
    hi: i64,
) -> Vec<Val<B::Ct>> {
    tables
        .iter()
        .flat_map(|t| e.secret_lut(idx, t, per, hi))
        .collect()
}

/// The clear index of a neuron on a frame the device holds in the clear.
fn clear_index(x: &[u8], n: &LutNeuron) -> usize {
    let terms = n.inputs.iter().zip(&n.mul);
    terms
        .map(|(&i, &m)| m as usize * x[i as usize] as usize)
        .sum()
}

impl Lut {
    /// A published layer: in the clear on a clear frame, else one PBS per neuron with its
    /// clear table (multiplied by the output's place).
    fn public_circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let e = cx.e;
        if let Tensor::Clear(x, _) = cx.inputs[0] {
            let out = self.neurons.iter().map(|n| n.table[clear_index(x, n)]);
            let bits = (8 - self.out_max.leading_zeros()) as u8;
            return Ok(Tensor::Clear(out.collect(), bits));
        }
        let outs = self.neurons.par_iter().enumerate().map(|(n, neuron)| {
            let m = cx.place.map_or(1, |p| p[n]) as i64;
            if m == 0 {
                return Ok(e.constant(0));
            }
            let idx = index(e, cx.inputs[0], neuron)?;
            Ok(e.lut(&idx, |v| m * neuron.table[v as usize] as i64))
        });
        Ok(Tensor::Scaled(outs.collect::<Result<_, EvalError>>()?))
    }
}

impl Circuit for Lut {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        if self.public {
            return self.public_circuit(cx);
        }
        let (e, p) = (cx.e, cx.params()?);
        let hi = |n: usize| cx.place.map_or(1, |p| p[n]) as i64 * self.out_max as i64;
        let outs = self.neurons.par_iter().enumerate().map(|(n, neuron)| {
            if cx.place.is_some_and(|p| p[n] == 0) {
                // nothing reads this neuron: it costs nothing (a constant nobody sees)
                return Ok(e.constant(0));
            }
            if let Tensor::Clear(x, _) = cx.inputs[0] {
                // device-clear: the owner encrypted every entry; the clear index picks one
                let ct = p.clear_tables[n * BLOCK as usize + clear_index(x, neuron)].clone();
                return Ok(e.fresh(ct, 0, hi(n)));
            }
            let idx = index(e, cx.inputs[0], neuron)?;
            let t = std::slice::from_ref(&p.tables[n]);
            Ok(lookups(e, &idx, t, 1, hi(n)).remove(0))
        });
        Ok(Tensor::Scaled(outs.collect::<Result<_, EvalError>>()?))
    }
}

impl Circuit for GroupSum {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let (e, p, classes) = (cx.e, cx.params()?, self.classes);
        let hi = self.score_max as i64;
        // where each group's tables start among the node's secret tables
        let mut starts = Vec::with_capacity(self.groups.len());
        let mut at = 0;
        for g in &self.groups {
            starts.push(at);
            at += classes.div_ceil(per_pbs(g.table.len() / classes));
        }
        let scores = self.groups.par_iter().enumerate().map(|(k, g)| {
            let span = g.table.len() / classes;
            if let Tensor::Clear(x, _) = cx.inputs[0] {
                let row = (k * BLOCK as usize + clear_index(x, g)) * classes;
                let pick = |c: usize| e.fresh(p.clear_tables[row + c].clone(), 0, hi);
                return Ok((0..classes).map(pick).collect::<Vec<_>>());
            }
            let idx = index(e, cx.inputs[0], g)?;
            let per = per_pbs(span);
            let n = classes.div_ceil(per);
            let mut s = lookups(e, &idx, &p.tables[starts[k]..starts[k] + n], per, hi);
            s.truncate(classes);
            Ok(s)
        });
        let scores: Vec<Vec<Val<B::Ct>>> = scores.collect::<Result<_, EvalError>>()?;
        let mut logits: Vec<Acc<B::Ct>> = (0..classes).map(|_| Acc::zero()).collect();
        for group in scores {
            for (acc, s) in logits.iter_mut().zip(group) {
                acc.push(0, s);
            }
        }
        Ok(Tensor::Acc(logits))
    }
}

/// The clear entries a device-clear layer picks from: for neuron (group) `n` and index
/// value `i`, entry `n·16 + i` (`group_sum`: `(n·16 + i)·classes + c`), already multiplied
/// by the output's place. Padding entries beyond a table's span are 0.
pub fn clear_entries(op: &Op, place: Option<&[u16]>) -> Vec<u64> {
    match TableLayer::of(op) {
        Some(TableLayer::Lut(l)) => l
            .neurons
            .iter()
            .enumerate()
            .flat_map(|(n, neuron)| {
                let m = place.map_or(1, |p| p[n]) as u64;
                (0..BLOCK as usize).map(move |i| m * *neuron.table.get(i).unwrap_or(&0) as u64)
            })
            .collect(),
        Some(TableLayer::GroupSum(g)) => g
            .groups
            .iter()
            .flat_map(|group| {
                (0..BLOCK as usize * g.classes)
                    .map(move |i| *group.table.get(i).unwrap_or(&0) as u64)
            })
            .collect(),
        None => Vec::new(),
    }
}
