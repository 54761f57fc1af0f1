//! Secret-table layers (issue 23): every neuron is one lookup table over at most 4 bits of
//! its layer's input, indexed by a public clear linear combination of a few input elements.
//!
//! - [`Lut`]: a layer of such neurons; its output is an activation `0..=out_max`.
//! - [`GroupSum`]: the output layer; each group's table gives one score per class and the
//!   logits are the sums of the groups' scores (an accumulator).
//!
//! The wiring, the multipliers and the table sizes are public; the table contents are the
//! owner's secret. Everything here reads untrusted values: the checks run before any table
//! is indexed, and nothing panics on a model that fails them.

use serde::{Deserialize, Serialize};

use crate::fhe::eval::InputMode;
use crate::model::{Kind, Model, ModelError, Node, Op, ValueInfo};

/// Largest index range of a table: the index is one 4-bit block.
pub const MAX_TABLE_INDEX: usize = 16;
/// Most inputs a neuron combines into its index.
pub const MAX_NEURON_INPUTS: usize = 4;
/// Largest table entry (one 4-bit block).
pub const MAX_ENTRY: u8 = 15;
/// Bound on neurons per layer and classes: keeps every size computation small.
pub const MAX_NEURONS: usize = 1 << 20;

/// A secret-table neuron: idx = Σ_k mul[k] · x[inputs[k]] over the layer's (flat) input
/// value, out = table[idx].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LutNeuron {
    pub inputs: Vec<u32>,
    pub mul: Vec<u16>,
    pub table: Vec<u8>,
}

/// A layer of secret tables: output is a flat activation (`Kind::Act { max: out_max }`) of
/// `neurons.len()` values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lut {
    pub out_max: u8,
    pub neurons: Vec<LutNeuron>,
}

/// The output layer: groups of features whose tables give one score per class;
/// `logits[c] = Σ_g groups[g].table[idx_g * classes + c]` (an accumulator, `Kind::Acc`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSum {
    pub classes: usize,
    pub score_max: u8,
    pub groups: Vec<LutNeuron>,
}

impl LutNeuron {
    /// Checks the neuron against its input value; returns its index range (table entries
    /// per output), i.e. `Σ mul[k]·max + 1`.
    fn check(&self, a: &ValueInfo, max: u8) -> Result<usize, String> {
        let n = self.inputs.len();
        if !(1..=MAX_NEURON_INPUTS).contains(&n) || self.mul.len() != n {
            return Err(format!(
                "needs 1..={MAX_NEURON_INPUTS} inputs and one multiplier per input, got {} inputs and {} multipliers",
                n,
                self.mul.len()
            ));
        }
        if let Some(&i) = self.inputs.iter().find(|&&i| i as usize >= a.len()) {
            return Err(format!(
                "input index {i} is out of range: the input value has {} elements",
                a.len()
            ));
        }
        if self.mul.contains(&0) {
            return Err(format!("multipliers must be positive, got {:?}", self.mul));
        }
        let top: u64 = self.mul.iter().map(|&m| m as u64 * max as u64).sum();
        if top as usize >= MAX_TABLE_INDEX {
            return Err(format!(
                "index range 0..={top} (multipliers {:?}, inputs up to {max}) exceeds one 4-bit block (at most {MAX_TABLE_INDEX} entries)",
                self.mul
            ));
        }
        Ok(top as usize + 1)
    }

    /// The table index for the input value `x` (checked neuron).
    fn index(&self, x: &[i64]) -> usize {
        self.inputs
            .iter()
            .zip(&self.mul)
            .map(|(&i, &m)| m as i64 * x[i as usize])
            .sum::<i64>() as usize
    }
}

/// The input value must be an activation; returns its largest value.
fn act_max(a: &ValueInfo) -> Result<u8, String> {
    match a.kind {
        Kind::Act { max } => Ok(max),
        Kind::Acc { .. } => {
            Err("input must be an activation (a lut layer or an Activation node)".into())
        }
    }
}

/// A table of `len` entries, each at most `max`.
fn check_table(t: &[u8], len: usize, max: u8, what: &str) -> Result<(), String> {
    if t.len() != len {
        return Err(format!(
            "table has {} entries but must have {len} (one per index{what})",
            t.len()
        ));
    }
    if let Some(v) = t.iter().find(|&&v| v > max) {
        return Err(format!(
            "table entry {v} exceeds the declared maximum {max}"
        ));
    }
    Ok(())
}

impl Lut {
    /// Checks the layer against its input value and returns its output's static type.
    pub fn info(&self, a: &ValueInfo) -> Result<ValueInfo, String> {
        let max = act_max(a)?;
        if !(1..=MAX_ENTRY).contains(&self.out_max) {
            return Err(format!(
                "out_max must be 1..={MAX_ENTRY}, got {}",
                self.out_max
            ));
        }
        if self.neurons.is_empty() || self.neurons.len() > MAX_NEURONS {
            return Err(format!(
                "needs 1..={MAX_NEURONS} neurons, got {}",
                self.neurons.len()
            ));
        }
        for (j, n) in self.neurons.iter().enumerate() {
            n.check(a, max)
                .and_then(|len| check_table(&n.table, len, self.out_max, ""))
                .map_err(|m| format!("neuron {j}: {m}"))?;
        }
        Ok(ValueInfo {
            shape: [self.neurons.len(), 1, 1],
            flat: true,
            kind: Kind::Act { max: self.out_max },
        })
    }

    /// Plaintext evaluation on a checked input.
    pub fn eval(&self, x: &[i64]) -> Vec<i64> {
        self.neurons
            .iter()
            .map(|n| n.table[n.index(x)] as i64)
            .collect()
    }
}

impl GroupSum {
    /// Checks the layer against its input value and returns its output's static type.
    pub fn info(&self, a: &ValueInfo) -> Result<ValueInfo, String> {
        let max = act_max(a)?;
        if !(2..=MAX_NEURONS).contains(&self.classes) {
            return Err(format!(
                "classes must be 2..={MAX_NEURONS}, got {}",
                self.classes
            ));
        }
        if !(1..=MAX_ENTRY).contains(&self.score_max) {
            return Err(format!(
                "score_max must be 1..={MAX_ENTRY}, got {}",
                self.score_max
            ));
        }
        if self.groups.is_empty() || self.groups.len() > MAX_NEURONS {
            return Err(format!(
                "needs 1..={MAX_NEURONS} groups, got {}",
                self.groups.len()
            ));
        }
        for (j, g) in self.groups.iter().enumerate() {
            g.check(a, max)
                .and_then(|len| {
                    check_table(&g.table, len * self.classes, self.score_max, " and class")
                })
                .map_err(|m| format!("group {j}: {m}"))?;
        }
        Ok(ValueInfo {
            shape: [self.classes, 1, 1],
            flat: true,
            kind: Kind::Acc {
                lo: 0,
                hi: self.groups.len() as i64 * self.score_max as i64,
            },
        })
    }

    /// Plaintext evaluation on a checked input: the logits.
    pub fn eval(&self, x: &[i64]) -> Vec<i64> {
        let mut logits = vec![0i64; self.classes];
        for g in &self.groups {
            let row = &g.table[g.index(x) * self.classes..][..self.classes];
            for (l, &s) in logits.iter_mut().zip(row) {
                *l += s as i64;
            }
        }
        logits
    }
}

/// The neurons (or groups) of a secret-table node.
fn neurons(op: &Op) -> Option<&[LutNeuron]> {
    match op {
        Op::Lut(l) => Some(&l.neurons),
        Op::GroupSum(g) => Some(&g.groups),
        _ => None,
    }
}

/// The engine's constraint on wiring: every element of a value is read with ONE multiplier
/// by all the secret-table neurons that read it, since the engine scales the producer's
/// table for that place instead of multiplying a ciphertext. `vals` are the nodes' checked
/// value types (as `Model::infer_values` builds them).
pub fn check_multipliers(nodes: &[Node], vals: &[ValueInfo]) -> Result<(), ModelError> {
    // per value: the multiplier each element is read with (0 = not read yet)
    let mut seen: Vec<Vec<u16>> = vals.iter().map(|_| Vec::new()).collect();
    for (k, node) in nodes.iter().enumerate() {
        let Some(ns) = neurons(&node.op) else {
            continue;
        };
        let v = node.inputs[0];
        let muls = &mut seen[v];
        muls.resize(vals[v].len(), 0);
        for n in ns {
            for (&i, &m) in n.inputs.iter().zip(&n.mul) {
                let prev = &mut muls[i as usize];
                if *prev != 0 && *prev != m {
                    return Err(ModelError::Node {
                        node: k,
                        op: node.op.name(),
                        msg: format!(
                            "element {i} of value {v} is read with two multipliers ({} and {m}); every element must be read with one multiplier by all its readers",
                            *prev
                        ),
                    });
                }
                *prev = m;
            }
        }
    }
    Ok(())
}

/// Whether the model has secret-table layers.
pub fn has_tables(model: &Model) -> bool {
    model.nodes.iter().any(|n| neurons(&n.op).is_some())
}

/// The encrypted engine of this build has no secret-table circuits yet: a clear refusal
/// instead of a panic (and the tables are never stored in the clear in an encrypted model).
pub fn refuse_fhe(model: &Model) -> Result<(), ModelError> {
    match model.nodes.iter().position(|n| neurons(&n.op).is_some()) {
        Some(k) => Err(ModelError::Node {
            node: k,
            op: model.nodes[k].op.name(),
            msg: "secret-table layers (lut, group_sum) are not evaluated under FHE in this build"
                .into(),
        }),
        None => Ok(()),
    }
}

/// Provisional PBS count of a secret-table model per inference, to be replaced by the
/// engine's plan: 1 PBS per Lut neuron; per GroupSum group ceil(classes/4) PBS when its
/// index has ≤ 2 bits (4 tables in one many-LUT PBS) else one per class, plus 0.5 per
/// class and group to carry the sums. With device-clear input, a Lut reading the frame,
/// and a Lut reading only such a Lut, cost nothing (the first index is clear on the
/// camera, the second picks owner-encrypted entries). Other layers count 0.
pub fn estimate_pbs(model: &Model, mode: InputMode) -> Result<u64, ModelError> {
    let vals = model.infer()?;
    // values computed without PBS in device-clear mode
    let mut free = vec![false; model.nodes.len() + 1];
    free[0] = mode == InputMode::DeviceClear;
    let mut halves = 0u64;
    for (k, node) in model.nodes.iter().enumerate() {
        let v = node.inputs[0];
        match &node.op {
            Op::Lut(_) if free[v] && (v == 0 || reads_input(model, v)) => free[k + 1] = true,
            Op::Lut(l) => halves += 2 * l.neurons.len() as u64,
            Op::GroupSum(g) => {
                let c = g.classes as u64;
                let Kind::Act { max } = vals[v].kind else {
                    continue;
                };
                for grp in &g.groups {
                    let top: u64 = grp.mul.iter().map(|&m| m as u64 * max as u64).sum();
                    let per = if top < 4 { c.div_ceil(4) } else { c };
                    halves += 2 * per + c;
                }
            }
            _ => {}
        }
    }
    Ok(halves.div_ceil(2))
}

/// Whether value `v` (> 0) is the output of a Lut node reading the model input.
fn reads_input(model: &Model, v: usize) -> bool {
    let n = &model.nodes[v - 1];
    matches!(n.op, Op::Lut(_)) && n.inputs[0] == 0
}
