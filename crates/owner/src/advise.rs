//! Why a model costs what it plans (`fhecam plan --advise`): per layer, its PBS, PBS per
//! MAC (linear layers) or per activation (tables), and for the costly ones the reason in
//! the terms of the model's author, with the saving of a change *planned* on the changed
//! model (the engine's own [`plan_mode`]), never guessed.
//!
//! Two changes are estimated:
//! - an activation table that is a uniform quantizer (levels 0, 1, 2, … one accumulator
//!   step apart) re-made on the nearest power-of-two step with evenly spaced thresholds,
//!   same number of levels: the thresholds then share their low base-4 digits and the
//!   engine reads the level from the digits above them instead of comparing each threshold
//!   digit by digit (`fhe::circuit::Engine::apply_table_digits`);
//! - a linear layer whose weights span more than 4 levels (two or more base-4 digits,
//!   one PBS per weight digit × activation digit) re-quantized to ternary weights
//!   (−1, 0, +1: one digit), its bias and the tables of the activations that read it
//!   rescaled to the new accumulator unit, so the model stays consistent.
//!
//! Pure: a model in, an [`Advice`] out (serde for `--json`); the CLI prints it.

use fhecam_engine::fhe::circuit::digits_for;
use fhecam_engine::fhe::eval::{
    check_device_clear, plan_mode, weight_digits, EvalError, InputMode,
};
use fhecam_engine::layer::ClearFrame;
use fhecam_engine::model::{ActTable, Kind, Model, Op, ValueInfo};
use serde::Serialize;

/// A change is reported when it saves at least this fraction of the model's PBS.
pub const MIN_SAVING: f64 = 0.05;

/// The whole model's figures and one entry per node.
#[derive(Clone, Debug, Serialize)]
pub struct Advice {
    /// "encrypted" or "device-clear".
    pub input_mode: String,
    pub total_pbs: u64,
    pub macs: u64,
    /// PBS of the output stage (carrying the logits into digits for the owner).
    pub output_pbs: u64,
    pub layers: Vec<LayerAdvice>,
}

/// One node: what it costs, and why when a change would save a part of it.
#[derive(Clone, Debug, Serialize)]
pub struct LayerAdvice {
    pub node: usize,
    pub op: String,
    /// Output shape (C, H, W).
    pub shape: [usize; 3],
    pub pbs: u64,
    /// This node's share of the model's PBS.
    pub share: f64,
    /// Linear layers: ciphertext multiply-accumulates, PBS per MAC, and what a product is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linear: Option<LinearFigures>,
    /// Activation tables: how many activations, PBS per activation, and the tables' steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationFigures>,
    /// The changes that would save at least [`MIN_SAVING`] of the model's PBS, each
    /// planned on the changed model.
    pub reasons: Vec<Reason>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LinearFigures {
    pub macs: u64,
    pub pbs_per_mac: f64,
    /// Bits of the weights (signed) and of the activations the layer reads.
    pub weight_bits: u8,
    pub activation_bits: u8,
    /// Base-4 digits of a weight and of an activation: a product costs their product in PBS.
    pub weight_digits: usize,
    pub activation_digits: usize,
    /// Terms of each sum (products per output).
    pub terms: usize,
    /// Bits the weights of one output need on their own (fewer than `weight_bits` when
    /// each output has its own scale and the layer's integers share one).
    pub weight_bits_per_output: u8,
    /// The layer reads the model's input (directly or flattened).
    pub reads_input: bool,
    /// The layer multiplies the frame the device holds in the clear (its products cost
    /// no PBS in device-clear mode).
    pub reads_clear_frame: bool,
}

impl LinearFigures {
    /// "3-bit weights{times}3-bit activations{over} 128-term sum": what the layer multiplies
    /// and sums, in the words `plan --advise` uses.
    pub fn operands(&self, times: &str, over: &str) -> String {
        let what = if self.reads_input {
            "input"
        } else {
            "activations"
        };
        format!(
            "{}-bit weights{times}{}-bit {what}{over} {}-term sum",
            self.weight_bits, self.activation_bits, self.terms
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ActivationFigures {
    pub activations: usize,
    pub pbs_per_activation: f64,
    pub bits: u8,
    /// Base-4 digits of the accumulator the tables read.
    pub accumulator_digits: usize,
    /// One per table (one, or one per channel).
    pub tables: Vec<TableFigures>,
}

/// A table's shape as a quantizer.
#[derive(Clone, Debug, Serialize)]
pub struct TableFigures {
    /// Accumulator values where the level changes.
    pub thresholds: Vec<i64>,
    /// Mean distance between thresholds in accumulator units, when the table is a uniform
    /// quantizer (levels one apart, at least 3 of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spacing: Option<f64>,
    /// The nearest power of two to `spacing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_of_two: Option<i64>,
    /// Whether every threshold is exactly `power_of_two` after the one before.
    pub evenly_spaced: bool,
    /// How many low base-4 digits all thresholds share (the engine compares only the
    /// digits above them).
    pub shared_low_digits: usize,
    /// Accumulator values from the first threshold to the last, inclusive (the engine
    /// reads a table whose changes fit 16 values as one block).
    pub span: i64,
}

/// One reason for a layer's cost and the planned saving of the change that removes it.
#[derive(Clone, Debug, Serialize)]
pub struct Reason {
    /// "spacing_not_power_of_two", "thresholds_not_evenly_spaced" or "wide_weights".
    pub kind: String,
    /// The reason and the change, in the model author's terms.
    pub text: String,
    /// The changed model, planned.
    pub estimate: Estimate,
    /// Power-of-two steps only: the same tables as ONNX's QuantizeLinear rounds them when
    /// the sums land exactly on the half-way points (ties to even: every other threshold
    /// one unit later), planned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ties_to_even: Option<Estimate>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    /// What was changed to plan it.
    pub change: String,
    /// This node's PBS in the changed model.
    pub layer_pbs: u64,
    /// Per activation (tables) or per MAC (linear layers) in the changed model.
    pub layer_pbs_per_unit: f64,
    /// The changed model's total.
    pub total_pbs: u64,
    /// This layer's PBS now / in the changed model.
    pub layer_factor: f64,
    /// The model's PBS now / in the changed model.
    pub total_factor: f64,
}

/// Plans `model` in `mode` and explains it.
pub fn advise(model: &Model, mode: InputMode) -> Result<Advice, EvalError> {
    let infos = model.infer()?;
    let (pbs, _) = plan_mode(model, mode)?;
    let total: u64 = pbs.iter().sum();
    let macs = model.macs()?;
    let clear = clear_values(model, mode);
    let frame = clear_values(model, InputMode::DeviceClear);
    let mut layers = Vec::with_capacity(model.nodes.len());
    for (k, node) in model.nodes.iter().enumerate() {
        let ins: Vec<&ValueInfo> = node.inputs.iter().map(|&v| &infos[v]).collect();
        let mut la = LayerAdvice {
            node: k,
            op: node.op.name().to_string(),
            shape: infos[k + 1].shape,
            pbs: pbs[k],
            share: ratio(pbs[k], total),
            linear: None,
            activation: None,
            reasons: Vec::new(),
        };
        if let Some(l) = node.op.linear() {
            let m = node.op.layer().macs(&ins);
            let max = act_max(ins[0]);
            let reads_clear = clear[node.inputs[0]];
            let f = LinearFigures {
                macs: m,
                pbs_per_mac: ratio(pbs[k], m),
                weight_bits: signed_bits(l.weight_range),
                activation_bits: unsigned_bits(max),
                weight_digits: weight_digits(l.weight_range),
                activation_digits: digits_for(max as u64),
                terms: l.weights.len() / l.bias.len().max(1),
                weight_bits_per_output: per_output_bits(l.weights, l.bias.len()),
                reads_input: frame[node.inputs[0]] || node.inputs[0] == 0,
                reads_clear_frame: reads_clear,
            };
            if let Some(r) = weights_reason(model, mode, k, &f, pbs[k], total) {
                la.reasons.push(r);
            }
            la.linear = Some(f);
        }
        if let Op::Activation(a) = &node.op {
            let n = infos[k + 1].len();
            let (lo, hi) = ins[0].range();
            let f = ActivationFigures {
                activations: n,
                pbs_per_activation: ratio(pbs[k], n as u64),
                bits: a.bits,
                accumulator_digits: digits_for((hi - lo) as u64),
                tables: a.tables.iter().map(table_figures).collect(),
            };
            if let Some(r) = table_reason(model, mode, k, &f, pbs[k], total) {
                la.reasons.push(r);
            }
            la.activation = Some(f);
        }
        layers.push(la);
    }
    Ok(Advice {
        input_mode: mode.name().to_string(),
        total_pbs: total,
        macs,
        output_pbs: *pbs.last().unwrap_or(&0),
        layers,
    })
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Which values the device holds in the clear: in device-clear mode the frame and its
/// flattenings (what the engine's `clear_values` says for models that allow that mode).
fn clear_values(model: &Model, mode: InputMode) -> Vec<bool> {
    let mut clear = vec![false; model.nodes.len() + 1];
    if mode != InputMode::DeviceClear || check_device_clear(model).is_err() {
        return clear;
    }
    clear[0] = true;
    for (k, n) in model.nodes.iter().enumerate() {
        if clear[n.inputs[0]] && n.op.layer().clear_frame() == ClearFrame::PassesThrough {
            clear[k + 1] = true;
        }
    }
    clear
}

fn act_max(v: &ValueInfo) -> u8 {
    match v.kind {
        Kind::Act { max } => max,
        Kind::Acc { .. } => 0,
    }
}

/// Smallest b with −2^(b−1) ≤ lo and hi ≤ 2^(b−1) − 1.
pub fn signed_bits(wr: [i8; 2]) -> u8 {
    let (lo, hi) = (wr[0] as i64, wr[1] as i64);
    (1..=8)
        .find(|&b| -(1i64 << (b - 1)) <= lo && hi < 1i64 << (b - 1))
        .unwrap_or(8)
}

/// Bits of a symmetric quantizer holding each output's weights: with `n` distinct nonzero
/// magnitudes in a row, 1 + ceil(log2(n + 1)) (ternary: 2), the most over the rows.
fn per_output_bits(w: &[i8], outputs: usize) -> u8 {
    let n = w.len() / outputs.max(1);
    w.chunks(n.max(1))
        .map(|row| {
            let mut mags: Vec<u8> = row
                .iter()
                .filter(|&&x| x != 0)
                .map(|x| x.unsigned_abs())
                .collect();
            mags.sort_unstable();
            mags.dedup();
            1 + (usize::BITS - mags.len().leading_zeros()) as u8
        })
        .max()
        .unwrap_or(1)
}

/// Bits of values in 0..=max.
pub fn unsigned_bits(max: u8) -> u8 {
    (8 - max.leading_zeros() as u8).max(1)
}

/// A uniform quantizer: levels rising by one at each threshold, at least 3 levels.
fn uniform(t: &ActTable) -> bool {
    let th = t.thresholds();
    th.len() >= 2
        && t.values
            .windows(2)
            .all(|w| w[1] == w[0] || w[1] == w[0] + 1)
}

fn table_figures(t: &ActTable) -> TableFigures {
    let th = t.thresholds();
    let (spacing, p2) = if uniform(t) {
        let s = (th[th.len() - 1] - th[0]) as f64 / (th.len() - 1) as f64;
        (Some(s), Some(nearest_power_of_two(s)))
    } else {
        (None, None)
    };
    let even = p2.is_some_and(|p| th.windows(2).all(|w| w[1] - w[0] == p));
    let shared = match th.first() {
        None => 0,
        Some(&first) => (1..20)
            .take_while(|&m| {
                let q = 1i64 << (2 * m);
                th.iter().all(|c| c.rem_euclid(q) == first.rem_euclid(q))
            })
            .count(),
    };
    let span = match (th.first(), th.last()) {
        (Some(a), Some(b)) => b - a + 1,
        _ => 0,
    };
    TableFigures {
        thresholds: th,
        spacing,
        power_of_two: p2,
        evenly_spaced: even,
        shared_low_digits: shared,
        span,
    }
}

/// 2^round(log2 s), at least 1.
pub fn nearest_power_of_two(s: f64) -> i64 {
    1i64 << (s.max(1.0).log2().round() as u32).min(40)
}

/// The table re-made on `step` with evenly spaced thresholds from its first one, same
/// levels: `min` is one before the first threshold, the last entry is the last threshold.
pub fn evenly_spaced(t: &ActTable, step: i64) -> ActTable {
    let th = t.thresholds();
    let (Some(&first), Some(&base)) = (th.first(), t.values.first()) else {
        return t.clone(); // a constant table has no spacing to change
    };
    let new: Vec<i64> = (0..th.len() as i64).map(|k| first + step * k).collect();
    let hi = first + step * (th.len() as i64 - 1);
    ActTable::from_fn(first - 1, hi, |x| {
        base + new.iter().filter(|&&c| c <= x).count() as u8
    })
}

/// [`evenly_spaced`] as ONNX rounds a step of `step` (even) when the sums hit its
/// half-way points: the 1st, 3rd, 5th … thresholds one unit later (a tie below an even
/// level rounds down to it).
pub fn ties_to_even(t: &ActTable, step: i64) -> ActTable {
    let e = evenly_spaced(t, step);
    if step % 2 == 1 {
        return e;
    }
    let th: Vec<i64> = e
        .thresholds()
        .iter()
        .enumerate()
        .map(|(k, &c)| c + (k % 2 == 0) as i64)
        .collect();
    let (Some(&first), Some(&last), Some(&base)) = (th.first(), th.last(), e.values.first()) else {
        return e;
    };
    ActTable::from_fn(first - 1, last, |x| {
        base + th.iter().filter(|&&c| c <= x).count() as u8
    })
}

/// The activation tables of node `k` on power-of-two steps, evenly spaced.
fn table_reason(
    model: &Model,
    mode: InputMode,
    k: usize,
    f: &ActivationFigures,
    pbs: u64,
    total: u64,
) -> Option<Reason> {
    let Op::Activation(a) = &model.nodes[k].op else {
        return None;
    };
    if f.tables.iter().any(|t| t.power_of_two.is_none()) || f.tables.iter().all(|t| t.evenly_spaced)
    {
        return None;
    }
    // the model with node k's tables re-made on their power-of-two steps by `remake`
    let retabled = |remake: fn(&ActTable, i64) -> ActTable| {
        let mut changed = model.clone();
        if let Op::Activation(na) = &mut changed.nodes[k].op {
            na.tables = a
                .tables
                .iter()
                .zip(&f.tables)
                .map(|(t, tf)| remake(t, tf.power_of_two.unwrap_or(1)))
                .collect();
        }
        changed
    };
    let est = estimate(
        &retabled(evenly_spaced),
        mode,
        k,
        pbs,
        total,
        f.activations as u64,
    )?;
    if (total.saturating_sub(est.total_pbs) as f64) < MIN_SAVING * total as f64 {
        return None;
    }
    let changed = retabled(ties_to_even);
    let ties = estimate(&changed, mode, k, pbs, total, f.activations as u64);
    let (kind, why) = tables_why(f);
    let spacings: Vec<f64> = f.tables.iter().filter_map(|t| t.spacing).collect();
    let steps: Vec<i64> = f.tables.iter().filter_map(|t| t.power_of_two).collect();
    let n_thr = f.tables[0].thresholds.len();
    let per = f.tables.len() > 1;
    let per_channel = per && range_f(&spacings).contains('–');
    let mut text = format!(
        "{why} ({:.0} PBS per activation); export this quantizer with power-of-two scales{} (spacing {}{} with evenly spaced thresholds would plan {:.0} PBS per activation, {} in all)",
        f.pbs_per_activation,
        if per_channel {
            ", per-tensor weight scales, and any BatchNorm folded into the layer before it is quantized"
        } else {
            ""
        },
        range_i(&steps),
        if per { " per channel" } else { "" },
        est.layer_pbs_per_unit,
        est.total_pbs
    );
    if let Some(t) = ties.as_ref().filter(|t| t.layer_pbs > est.layer_pbs) {
        text.push_str(&format!(
            "; but ONNX rounds ties to even: where the sums can land on the half-way points, every other threshold moves one unit and that table plans {:.0} PBS per activation ({} in all)",
            t.layer_pbs_per_unit, t.total_pbs
        ));
    }
    Some(Reason {
        kind: kind.into(),
        text,
        estimate: Estimate {
            change: format!(
                "each table re-made on the nearest power-of-two step ({}), thresholds evenly spaced from the first, same {} levels",
                range_i(&steps),
                n_thr + 1
            ),
            ..est
        },
        ties_to_even: ties.map(|t| Estimate {
            change: "the same tables with the 1st, 3rd, 5th … thresholds one unit later (ONNX's ties to even)".into(),
            ..t
        }),
    })
}

/// Why the tables of an activation cost what they do: the reason's kind and its words.
fn tables_why(f: &ActivationFigures) -> (&'static str, String) {
    let spacings: Vec<f64> = f.tables.iter().filter_map(|t| t.spacing).collect();
    let steps: Vec<i64> = f.tables.iter().filter_map(|t| t.power_of_two).collect();
    let n_thr = f.tables[0].thresholds.len();
    let pow2 = f.tables.iter().all(|t| {
        matches!((t.spacing, t.power_of_two), (Some(s), Some(p)) if (s - p as f64).abs() < 1e-9)
    });
    let per = f.tables.len() > 1;
    let digit_by_digit = f
        .tables
        .iter()
        .all(|t| t.shared_low_digits == 0 && t.span > 16);
    let per_channel = if per && range_f(&spacings).contains('–') {
        " (they differ per channel: per-channel weight scales or a BatchNorm scale them)"
    } else {
        ""
    };
    if pow2 {
        (
            "thresholds_not_evenly_spaced",
            format!(
                "level spacing {} accumulator units is a power of two, but the {n_thr} thresholds are not evenly spaced (ONNX rounds ties to even), so they share no low digits",
                range_i(&steps)
            ),
        )
    } else {
        (
            "spacing_not_power_of_two",
            format!(
                "level spacing {} accumulator units{per_channel} is not a power of two: {}",
                range_f(&spacings),
                if digit_by_digit {
                    format!(
                        "each of {n_thr} thresholds is compared digit by digit on the {}-digit accumulator",
                        f.accumulator_digits
                    )
                } else {
                    format!(
                        "its {n_thr} thresholds are compared on the {}-digit accumulator",
                        f.accumulator_digits
                    )
                }
            ),
        )
    }
}

fn range_f(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if (hi - lo).abs() < 0.5 {
        format!("{lo:.0}")
    } else {
        format!("{lo:.0}–{hi:.0}")
    }
}

fn range_i(v: &[i64]) -> String {
    let mut u = v.to_vec();
    u.sort_unstable();
    u.dedup();
    u.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Ternary weights for linear node `k`, the accumulator's consumers rescaled.
fn weights_reason(
    model: &Model,
    mode: InputMode,
    k: usize,
    f: &LinearFigures,
    pbs: u64,
    total: u64,
) -> Option<Reason> {
    if f.weight_digits < 2 {
        return None;
    }
    let changed = ternary(model, k)?;
    let est = estimate(&changed, mode, k, pbs, total, f.macs)?;
    let saving = total.saturating_sub(est.total_pbs);
    if (saving as f64) < MIN_SAVING * total as f64 {
        return None;
    }
    let what = format!("products of {}", f.operands(" × ", " over a"));
    let text = if f.weight_bits_per_output < f.weight_bits {
        format!(
            "{what}: each output's weights are {}-bit on a scale of its own, and the import puts them on one scale ({}-bit integers, {} digits × {} activation digits: {} PBS per product); export this layer with one (per-tensor) weight scale: 2-bit weights (−1, 0, +1) would cut it about {:.1}× ({} → {} PBS; {} in all)",
            f.weight_bits_per_output,
            f.weight_bits,
            f.weight_digits,
            f.activation_digits,
            f.weight_digits * f.activation_digits,
            est.layer_factor,
            pbs,
            est.layer_pbs,
            est.total_pbs
        )
    } else if f.reads_clear_frame {
        format!(
            "{what}: the products with the clear frame cost no PBS, but these weights widen the sums the next table carries and compares; 2-bit weights (−1, 0, +1) would plan {} in all ({:.1}× fewer)",
            est.total_pbs, est.total_factor
        )
    } else {
        format!(
            "{what} ({} weight digits × {} activation digits: {} PBS per product, {:.2} PBS per MAC in this layer): 2-bit weights (−1, 0, +1) would cut this layer about {:.1}× ({} → {} PBS; {} in all)",
            f.weight_digits,
            f.activation_digits,
            f.weight_digits * f.activation_digits,
            f.pbs_per_mac,
            est.layer_factor,
            pbs,
            est.layer_pbs,
            est.total_pbs
        )
    };
    Some(Reason {
        kind: "wide_weights".into(),
        text,
        estimate: Estimate {
            change: "weights re-quantized to −1, 0, +1 (w / max|w| rounded), bias and the next activation tables rescaled to the new accumulator unit".into(),
            ..est
        },
        ties_to_even: None,
    })
}

/// Node `k`'s weights as −1, 0, +1 on a scale `r = max|w|` times coarser: bias divided by
/// `r`, and every activation table reading the node looked up at `r·a`. `None` when
/// something other than activation tables reads the node's sums.
pub fn ternary(model: &Model, k: usize) -> Option<Model> {
    let mut m = model.clone();
    let readers: Vec<usize> = (0..m.nodes.len())
        .filter(|&j| m.nodes[j].inputs.contains(&(k + 1)))
        .collect();
    if readers
        .iter()
        .any(|&j| !matches!(m.nodes[j].op, Op::Activation(_)))
    {
        return None;
    }
    let l = m.nodes[k].op.layer_mut().linear_mut()?;
    let (w, b, wr, br) = (l.weights, l.bias, l.weight_range, l.bias_range);
    let r = (wr[0] as f64).abs().max(wr[1] as f64).max(1.0);
    for x in w.iter_mut() {
        *x = (*x as f64 / r).round().clamp(-1.0, 1.0) as i8;
    }
    *wr = [
        (wr[0] as f64 / r).round().clamp(-1.0, 0.0) as i8,
        (wr[1] as f64 / r).round().clamp(0.0, 1.0) as i8,
    ];
    for x in b.iter_mut() {
        *x = (*x as f64 / r).round() as i32;
    }
    *br = [
        (br[0] as f64 / r).floor() as i32,
        (br[1] as f64 / r).ceil() as i32,
    ];
    for j in readers {
        if let Op::Activation(a) = &mut m.nodes[j].op {
            for t in &mut a.tables {
                let lo = (t.min as f64 / r).floor() as i64;
                let hi = ((t.min + t.values.len() as i64 - 1) as f64 / r).ceil() as i64;
                let old = t.clone();
                *t = ActTable::from_fn(lo, hi, |x| old.lookup((x as f64 * r).round() as i64));
            }
        }
    }
    Some(m)
}

fn estimate(
    changed: &Model,
    mode: InputMode,
    k: usize,
    pbs: u64,
    total: u64,
    units: u64,
) -> Option<Estimate> {
    changed.infer().ok()?;
    let (p, _) = plan_mode(changed, mode).ok()?;
    let t: u64 = p.iter().sum();
    Some(Estimate {
        change: String::new(),
        layer_pbs: p[k],
        layer_pbs_per_unit: ratio(p[k], units),
        total_pbs: t,
        layer_factor: ratio(pbs, p[k]),
        total_factor: ratio(total, t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_become_powers_of_two_with_evenly_spaced_thresholds() {
        assert_eq!(nearest_power_of_two(130.7), 128);
        assert_eq!(nearest_power_of_two(75.5), 64);
        assert_eq!(nearest_power_of_two(4.0), 4);
        // levels 0..=3 changing at 66, 196, 327
        let t = ActTable::from_fn(65, 327, |x| {
            (x >= 66) as u8 + (x >= 196) as u8 + (x >= 327) as u8
        });
        assert_eq!(t.thresholds(), vec![66, 196, 327]);
        let f = table_figures(&t);
        assert_eq!((f.power_of_two, f.evenly_spaced), (Some(128), false));
        assert_eq!(evenly_spaced(&t, 128).thresholds(), vec![66, 194, 322]);
        assert_eq!(ties_to_even(&t, 128).thresholds(), vec![67, 194, 323]);
        assert_eq!(signed_bits([-3, 3]), 3);
        assert_eq!(signed_bits([-1, 1]), 2);
        assert_eq!(signed_bits([-127, 127]), 8);
        assert_eq!(unsigned_bits(7), 3);
    }
}
