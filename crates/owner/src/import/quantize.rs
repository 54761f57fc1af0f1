//! Post-training quantization of a float graph into the engine's integer model.
//!
//! Every float value is represented in the integer model either as an *activation* (per
//! channel: `x ≈ z_c + s_c·q`, q in `0..2^bits`) or as an *accumulator* (per channel:
//! `x ≈ b_c + a_c·t`). Linear layers absorb their input's (z, s) into float weights and bias
//! before rounding, so per-input-channel scales cost nothing; per-output-channel weight
//! scales become per-channel activation tables. Every nonlinearity, requantization and
//! zero point ends up in an exact lookup table, which the engine evaluates by PBS.

use super::graph::{ActFn, FGraph, FOp, FShape, QSpec};
use super::ImportError;
use crate::npy::Array;
use fhecam_engine::model::{
    ActTable, Activation, Add, Conv2d, Dense, Flatten, InputSpec, Model, Node, Op, SumPool,
    ValueInfo, MAX_ACT_BITS, MAX_INPUT_BITS, MODEL_FORMAT_VERSION,
};

/// Bit widths of the integer model.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct QuantConfig {
    /// Signed weight bits (2..=8): levels -2^(b-1)..2^(b-1)-1.
    pub weight_bits: u8,
    /// Activation bits (1..=4).
    pub act_bits: u8,
    /// Input bits (1..=4).
    pub input_bits: u8,
    /// One weight scale per output channel (else one per layer).
    pub per_channel: bool,
    /// Signed weight bits of the output layer (2..=8), whose one scale is shared by all
    /// classes so that the argmax compares like with like.
    pub output_weight_bits: u8,
    /// Put each ReLU or requantization on a step of 2^k accumulator units per level (its
    /// scale moves by a factor within 0.71..1.41; the next layer absorbs the change): the
    /// engine then reads the level from two or three digits of the accumulator instead of
    /// comparing it with 15 thresholds.
    pub pow2_steps: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            weight_bits: DEFAULT_WEIGHT_BITS,
            act_bits: DEFAULT_ACT_BITS,
            input_bits: DEFAULT_ACT_BITS,
            per_channel: true,
            output_weight_bits: DEFAULT_OUTPUT_WEIGHT_BITS,
            pow2_steps: true,
        }
    }
}

/// Defaults measured on the fixtures (docs/IMPORT.md): 6-bit weights and 4-bit activations
/// keep every imported model within a point of its float accuracy (8-bit weights gain
/// nothing more there and cost a third more PBS; 4-bit weights lose 1–2 points).
pub const DEFAULT_WEIGHT_BITS: u8 = 6;
pub const DEFAULT_ACT_BITS: u8 = 4;
pub const DEFAULT_OUTPUT_WEIGHT_BITS: u8 = 8;

impl QuantConfig {
    pub fn check(&self) -> Result<(), ImportError> {
        for (what, b) in [
            ("--weight-bits", self.weight_bits),
            ("--output-weight-bits", self.output_weight_bits),
        ] {
            if !(2..=8).contains(&b) {
                return Err(ImportError::Config(format!("{what} {b} is outside 2..=8")));
            }
        }
        for (what, b, max) in [
            ("--act-bits", self.act_bits, MAX_ACT_BITS),
            ("--input-bits", self.input_bits, MAX_INPUT_BITS),
        ] {
            if !(1..=max).contains(&b) {
                return Err(ImportError::Config(format!(
                    "{what} {b} is outside 1..={max}"
                )));
            }
        }
        Ok(())
    }
}

/// Per value, per channel: the (min, max) the calibration data reached.
pub type Ranges = Vec<Vec<(f32, f32)>>;

/// Runs the float graph on every calibration sample and records per-channel ranges.
pub fn calibrate(g: &FGraph, shapes: &[FShape], data: &Array) -> Ranges {
    let mut r: Ranges = shapes
        .iter()
        .map(|s| vec![(f32::INFINITY, f32::NEG_INFINITY); s.channels()])
        .collect();
    for i in 0..data.samples() {
        let vals = g.forward(data.sample(i), shapes);
        for (v, x) in vals.iter().enumerate() {
            let per = x.len() / shapes[v].channels();
            for (j, &y) in x.iter().enumerate() {
                let e = &mut r[v][j / per];
                e.0 = e.0.min(y);
                e.1 = e.1.max(y);
            }
        }
    }
    r
}

#[derive(Clone, Debug)]
enum Rep {
    /// x ≈ z_c + s_c · q
    Act { v: usize, z: Vec<f32>, s: Vec<f32> },
    /// x ≈ b_c + a_c · t
    Acc { v: usize, a: Vec<f32>, b: Vec<f32> },
}

impl Rep {
    fn v(&self) -> usize {
        match self {
            Rep::Act { v, .. } | Rep::Acc { v, .. } => *v,
        }
    }
    /// As an affine view (a, b) of the integer value.
    fn affine(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            Rep::Act { z, s, .. } => (s.clone(), z.clone()),
            Rep::Acc { a, b, .. } => (a.clone(), b.clone()),
        }
    }
}

/// What a linear layer was quantized from, so it can be redone on a forced scale.
#[derive(Clone)]
struct LinearSrc {
    x: Rep,
    in_shape: FShape,
    out: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
    conv: Option<([usize; 2], [usize; 2], [usize; 2])>,
    scales: Vec<f32>,
    /// The weights are the model's own integers (on `scales`): clamp to 8 bits only.
    given: bool,
}

struct Builder<'a> {
    m: Model,
    cfg: QuantConfig,
    ranges: &'a Ranges,
    /// Linear layers by the model value they produce.
    linear: std::collections::HashMap<usize, LinearSrc>,
    /// Where the integer model departs from a quantized ONNX model, per layer.
    notes: Vec<String>,
    /// Activation quantizers of the ONNX model whose level spacing is near a power of two
    /// in accumulator units: the tables that spacing would give, to be planned.
    pow2_alts: Vec<Pow2Alt>,
}

/// An activation quantizer re-made on power-of-two level spacings (per channel), as ONNX
/// would evaluate it had the model been exported with such scales.
struct Pow2Alt {
    /// The model node of the activation.
    node: usize,
    tables: Vec<ActTable>,
    origin: String,
    /// Accumulator units per level now, and the powers of two, per channel.
    spacing: Vec<f32>,
    pow2: Vec<i64>,
}

impl Builder<'_> {
    fn push(&mut self, op: Op, inputs: Vec<usize>) -> usize {
        self.m.nodes.push(Node { op, inputs });
        self.m.nodes.len()
    }
    fn info(&self, v: usize) -> Result<ValueInfo, ImportError> {
        Ok(self.m.infer_values()?.swap_remove(v))
    }

    /// Output (z, s) per channel covering the float range of a value.
    fn act_params(&self, range: &[(f32, f32)], bits: u8) -> (Vec<f32>, Vec<f32>) {
        let top = ((1u32 << bits) - 1) as f32;
        range
            .iter()
            .map(|&(lo, hi)| {
                let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 0.0) };
                let z = lo.min(0.0);
                let s = (hi.max(z) - z) / top;
                (z, if s > 1e-12 { s } else { 1.0 })
            })
            .unzip()
    }

    /// Applies `f` to a value and requantizes it to an activation with per-channel
    /// (z, s): one table per channel.
    /// `free_scale`: keep `s` as given (both sides of a residual Add share it).
    fn requantize(
        &mut self,
        rep: &Rep,
        f: ActFn,
        z: &[f32],
        s: &[f32],
        origin: &str,
        free_scale: bool,
    ) -> Result<Rep, ImportError> {
        let bits = self.cfg.act_bits;
        let top = (1i64 << bits) - 1;
        let info = self.info(rep.v())?;
        let (a, _) = rep.affine();
        let chans = info.shape[0];
        // Levels of a ReLU or a requantization are s/a accumulator units apart: on a power
        // of two, the engine reads them from the accumulator's digits.
        let steps: Vec<Option<i64>> = (0..chans)
            .map(|c| {
                let uniform = matches!(f, ActFn::Relu | ActFn::Identity);
                let r = s[c] / a[c];
                // the nearest power of two in log scale: the scale moves by 0.71..1.41
                (self.cfg.pow2_steps && !free_scale && uniform && a[c] > 0.0 && r.is_finite())
                    .then(|| 1i64 << (r.log2().round().clamp(0.0, 30.0) as u32))
            })
            .collect();
        let s: Vec<f32> = (0..chans)
            .map(|c| steps[c].map_or(s[c], |k| a[c] * k as f32))
            .collect();
        let level = |c: usize, y: f32| (((y - z[c]) / s[c]).round() as i64).clamp(0, top);
        let tables = self.tables(rep, f, &level, &steps, true, origin)?;
        let v = self.push(Op::Activation(Activation { bits, tables }), vec![rep.v()]);
        Ok(Rep::Act {
            v,
            z: z.to_vec(),
            s,
        })
    }

    /// A quantizer of the ONNX model (after `f`, the activation it follows), exactly when
    /// it has at most 16 levels.
    fn requantize_spec(
        &mut self,
        rep: &Rep,
        f: ActFn,
        q: QSpec,
        origin: &str,
    ) -> Result<Rep, ImportError> {
        let levels = q.levels() as i64;
        let max = 1i64 << MAX_ACT_BITS;
        // wider than the engine's activations: merge every k levels
        let k = (levels - 1 + max - 2) / (max - 1);
        let top = (levels - 1) / k;
        let bits = (64 - top.leading_zeros()).max(1) as u8;
        let level = |_: usize, y: f32| ((q.level(y) - q.qmin) as i64 + k / 2) / k;
        let info = self.info(rep.v())?;
        let chans = info.shape[0];
        let (z, s) = (q.scale * (q.qmin - q.zero) as f32, q.scale * k as f32);
        // the same quantizer again (ONNX Runtime puts one around a Flatten): nothing to do
        if let (Rep::Act { z: rz, s: rs, .. }, ActFn::Identity) = (rep, f) {
            if rz.iter().all(|v| *v == z) && rs.iter().all(|v| *v == s) {
                return Ok(rep.clone());
            }
        }
        if k > 1 {
            self.notes.push(format!(
                "{origin}: a quantizer of {levels} levels is wider than fhecam's {max}: every {k} levels merged into one (approximation: up to {:.3} off, {} of its steps of {})",
                q.scale * (k / 2) as f32,
                k / 2,
                q.scale
            ));
        }
        let tables = self.tables(rep, f, &level, &vec![None; chans], k > 1, origin)?;
        let v = self.push(Op::Activation(Activation { bits, tables }), vec![rep.v()]);
        if k == 1 && matches!(f, ActFn::Relu | ActFn::Identity) {
            self.pow2_alt(rep, f, q, v - 1, origin)?;
        }
        Ok(Rep::Act {
            v,
            z: vec![z; chans],
            s: vec![s; chans],
        })
    }

    /// When every channel's level spacing `scale / a_c` (accumulator units) is within
    /// 0.7..1.4 of a power of two (≥ 2) and one is not exactly one: the tables the quantizer
    /// would have on those powers of two (ONNX's rounding, ties to even), to be planned.
    fn pow2_alt(
        &mut self,
        rep: &Rep,
        f: ActFn,
        q: QSpec,
        node: usize,
        origin: &str,
    ) -> Result<(), ImportError> {
        let (a, _) = rep.affine();
        let chans = self.info(rep.v())?.shape[0];
        let spacing: Vec<f32> = a[..chans].iter().map(|a| q.scale / a).collect();
        let pow2: Vec<i64> = spacing
            .iter()
            .map(|r| match r.is_finite() && *r >= 1.4 {
                true => 1i64 << (r.log2().round().clamp(1.0, 40.0) as u32),
                false => 0,
            })
            .collect();
        let near = |(r, p): (&f32, &i64)| *p > 0 && (0.7..=1.4).contains(&(r / *p as f32));
        let exact = spacing.iter().zip(&pow2).all(|(r, p)| *r == *p as f32);
        if exact || !spacing.iter().zip(&pow2).all(near) {
            return Ok(());
        }
        let level = |c: usize, y: f32| {
            let qc = QSpec {
                scale: a[c] * pow2[c] as f32,
                ..q
            };
            (qc.level(y) - q.qmin) as i64
        };
        let tables = self.tables(rep, f, &level, &vec![None; chans], false, origin)?;
        self.pow2_alts.push(Pow2Alt {
            node,
            tables,
            origin: origin.to_string(),
            spacing,
            pow2,
        });
        Ok(())
    }

    /// Notes on the quantizers a power-of-two spacing would make cheaper: each planned
    /// (device-clear input) with its power-of-two tables against the model as it is.
    fn pow2_advice(&self) -> Vec<String> {
        use fhecam_engine::fhe::eval::{plan_mode, InputMode};
        let plan = |m: &Model| plan_mode(m, InputMode::DeviceClear).ok().map(|p| p.0);
        let Some(now) = plan(&self.m) else {
            return vec![];
        };
        let infos = self.m.infer_values().ok();
        let mut advice = vec![];
        for alt in &self.pow2_alts {
            let mut m = self.m.clone();
            if let Op::Activation(act) = &mut m.nodes[alt.node].op {
                act.tables = alt.tables.clone();
            }
            let Some(then) = plan(&m) else { continue };
            let (cur, new) = (now[alt.node], then[alt.node]);
            if new >= cur {
                continue;
            }
            let per = infos.as_ref().map_or(1, |v| v[alt.node + 1].len().max(1)) as f64;
            let range = |v: &[f64]| {
                let (lo, hi) = v
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
                if lo == hi {
                    format!("{lo:.0}")
                } else {
                    format!("{lo:.0}..{hi:.0}")
                }
            };
            let spacing: Vec<f64> = alt.spacing.iter().map(|&r| r as f64).collect();
            let pow2: Vec<f64> = alt.pow2.iter().map(|&p| p as f64).collect();
            advice.push(format!(
                "{}: its levels are {} accumulator units apart (input scale × weight scale / activation scale), within 0.7..1.4 of the power of two {}; exported with scales that make the spacing exactly {} (power-of-two input, weight and activation scales), this layer would plan {new} PBS instead of {cur} with device-clear input ({:.1} instead of {:.1} per activation)",
                alt.origin,
                range(&spacing),
                range(&pow2),
                range(&pow2),
                new as f64 / per,
                cur as f64 / per,
            ));
        }
        advice
    }

    /// Per channel, the table of `level(c, f(x))` over the value's integer range (one
    /// table when all are equal). `steps`: the channel's levels are exactly this many
    /// integer units apart.
    fn tables(
        &self,
        rep: &Rep,
        f: ActFn,
        level: &dyn Fn(usize, f32) -> i64,
        steps: &[Option<i64>],
        snap: bool,
        origin: &str,
    ) -> Result<Vec<ActTable>, ImportError> {
        let info = self.info(rep.v())?;
        let (tlo, thi) = info.range();
        let (a, b) = rep.affine();
        let chans = info.shape[0];
        let mut tables = Vec::with_capacity(chans);
        for c in 0..chans {
            let (ac, bc) = (a[c], b[c]);
            let q = |t: i64| -> i64 { level(c, f.apply(ac * t as f32 + bc)) };
            // q is monotone (f is, a ≥ 0): the table only needs the span where it changes;
            // the engine clamps everything outside to the end values.
            let (q_lo, q_hi) = (q(tlo), q(thi));
            let table = if q_lo == q_hi {
                ActTable {
                    min: tlo,
                    values: vec![q_lo as u8],
                }
            } else {
                // first t reaching each level
                let mut th: Vec<i64> = ((q_lo + 1)..=q_hi)
                    .map(|l| partition(tlo, thi, |t| q(t) < l))
                    .collect();
                if let Some(k) = steps[c] {
                    // exactly k apart, whatever float rounding did near the ties
                    let t0 = th[0];
                    for (i, t) in th.iter_mut().enumerate() {
                        *t = t0 + i as i64 * k;
                    }
                }
                // Snap the thresholds to multiples of 4^m, moving none by more than 1/16 of
                // the narrowest level: the engine then compares only the digits above m.
                // (Not for the model's own quantizers: they are kept exactly.)
                let gap = th.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(0);
                let mut unit = 1i64;
                while snap && th.len() > 1 && unit * 4 * 16 <= gap {
                    unit *= 4;
                }
                for t in &mut th {
                    *t = (*t + unit / 2).div_euclid(unit) * unit;
                }
                let (from, to) = ((th[0] - 1).max(tlo), (*th.last().unwrap()).min(thi));
                if to - from >= 1 << 20 {
                    return Err(ImportError::Quantize(format!(
                        "{origin}: an activation table would need {} entries (limit 2^20); use fewer --weight-bits",
                        to - from + 1
                    )));
                }
                ActTable::from_fn(from, to, |t| {
                    (q_lo + th.iter().filter(|&&x| x <= t).count() as i64) as u8
                })
            };
            tables.push(table);
        }
        if tables.iter().all(|t| *t == tables[0]) {
            tables.truncate(1);
        }
        Ok(tables)
    }

    /// An activation of the value; accumulators are requantized over their float range.
    fn ensure_act(&mut self, rep: Rep, fv: usize, origin: &str) -> Result<Rep, ImportError> {
        match rep {
            Rep::Act { .. } => Ok(rep),
            Rep::Acc { .. } => {
                let (z, s) = self.act_params(&self.ranges[fv], self.cfg.act_bits);
                self.requantize(&rep, ActFn::Identity, &z, &s, origin, false)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        x: &Rep,
        in_shape: FShape,
        out: usize,
        weights: &[f32],
        bias: &[f32],
        per_tensor: bool,
        conv: Option<([usize; 2], [usize; 2], [usize; 2])>,
        weight_scale: Option<&[f32]>,
        origin: &str,
    ) -> Result<Rep, ImportError> {
        let mut src = LinearSrc {
            x: x.clone(),
            in_shape,
            out,
            weights: weights.to_vec(),
            bias: bias.to_vec(),
            conv,
            scales: vec![],
            given: false,
        };
        let given = weight_scale.and_then(|ws| self.given_scales(&src, ws, per_tensor, origin));
        src.given = given.is_some();
        let (op, scales, frac) = self.linear_op(&src, per_tensor, given.as_deref());
        let v = self.push(op, vec![x.v()]);
        src.scales = scales.clone();
        // The model's own integers: what of the bias is not on the accumulator's grid (a
        // float bias, a folded BatchNormalization) stays in the affine view, so the next
        // table sees the exact value. Not for the logits: their argmax reads the integers.
        let b = if src.given && !per_tensor {
            frac
        } else {
            vec![0.0; out]
        };
        self.linear.insert(v, src);
        Ok(Rep::Acc { v, a: scales, b })
    }

    /// The accumulator scales on which a layer's quantized weights (DequantizeLinear,
    /// `ws` per output) stay the exported integers: `ws · s` for an input on one grid `s`.
    /// `None`, with a note, where that is not so.
    fn given_scales(
        &mut self,
        src: &LinearSrc,
        ws: &[f32],
        per_tensor: bool,
        origin: &str,
    ) -> Option<Vec<f32>> {
        let Rep::Act { s, .. } = &src.x else {
            return None;
        };
        let mut why = None;
        if s.iter().any(|v| (v / s[0] - 1.0).abs() > 1e-6) {
            why = Some("its input is not on one quantized grid");
        } else if per_tensor && ws.iter().any(|w| *w != ws[0]) {
            why = Some("the output layer needs one scale for every class (the argmax compares them), and its weights have one per class");
        }
        let forced: Vec<f32> = ws.iter().map(|w| w * s[0]).collect();
        let per_out = src.weights.len() / src.out;
        let off = src.weights.iter().enumerate().any(|(i, w)| {
            let q = w * s[0] / forced[i / per_out];
            (q - q.round()).abs() > 1e-3 || !(-128.0..=127.0).contains(&q.round())
        });
        if why.is_none() && off {
            why = Some("its weights are not 8-bit integers on their scale");
        }
        match why {
            None => Some(forced),
            Some(w) => {
                self.notes.push(format!(
                    "{origin}: weights quantized again ({w}; approximation)"
                ));
                None
            }
        }
    }

    /// The quantized layer and its per-output scales (`forced`: use these scales).
    fn linear_op(
        &self,
        src: &LinearSrc,
        per_tensor: bool,
        forced: Option<&[f32]>,
    ) -> (Op, Vec<f32>, Vec<f32>) {
        let LinearSrc {
            x,
            in_shape,
            out,
            weights,
            bias,
            conv,
            ..
        } = src;
        let (in_shape, out, conv) = (*in_shape, *out, *conv);
        let Rep::Act { z, s, .. } = x else {
            unreachable!("linear layers read activations")
        };
        let per_out = weights.len() / out;
        // input index within one output's weights -> input channel
        let chan = |i: usize| match conv {
            Some((k, _, _)) => i / (k[0] * k[1]),
            None => in_shape.info().channel_of(i),
        };
        let mut wf = weights.to_vec();
        let mut bf = bias.to_vec();
        for o in 0..out {
            for i in 0..per_out {
                let w = weights[o * per_out + i];
                wf[o * per_out + i] = w * s[chan(i)];
                bf[o] += w * z[chan(i)];
            }
        }
        // the output layer shares one scale across classes; it gets its own width
        let bits = if src.given {
            8
        } else if per_tensor {
            self.cfg.output_weight_bits
        } else {
            self.cfg.weight_bits
        };
        let q = ((1i32 << (bits - 1)) - 1) as f32;
        let scales: Vec<f32> = if let Some(f) = forced {
            f.to_vec()
        } else if self.cfg.per_channel && !per_tensor {
            (0..out)
                .map(|o| weight_scale(&wf[o * per_out..(o + 1) * per_out], q))
                .collect()
        } else {
            vec![weight_scale(&wf, q); out]
        };
        let scales: Vec<f32> = scales
            .into_iter()
            .map(|s| if s > 1e-12 { s } else { 1.0 })
            .collect();
        let wq: Vec<i8> = wf
            .iter()
            .enumerate()
            .map(|(i, w)| (w / scales[i / per_out]).round().clamp(-q - 1.0, q) as i8)
            .collect();
        let bq: Vec<i32> = bf
            .iter()
            .zip(&scales)
            .map(|(b, s)| (b / s).round().clamp(-(1 << 19) as f32, (1 << 19) as f32) as i32)
            .collect();
        // the part of each bias the integer bias does not carry
        let frac: Vec<f32> = (0..out).map(|o| bf[o] - bq[o] as f32 * scales[o]).collect();
        let wr = [
            *wq.iter().min().unwrap_or(&0),
            *wq.iter().max().unwrap_or(&0),
        ];
        let br = [
            *bq.iter().min().unwrap_or(&0),
            *bq.iter().max().unwrap_or(&0),
        ];
        let op = match conv {
            Some((kernel, stride, padding)) => Op::Conv2d(Conv2d {
                out_channels: out,
                kernel,
                stride,
                padding,
                weights: wq,
                bias: bq,
                weight_range: wr,
                bias_range: br,
            }),
            None => Op::Dense(Dense {
                out_features: out,
                weights: wq,
                bias: bq,
                weight_range: wr,
                bias_range: br,
            }),
        };
        (op, scales, frac)
    }

    /// `acc + m·act` exactly: re-quantizes the linear layer behind `acc` (which nothing
    /// else reads) on the scale `s_c / m_c` of the activation's grid. None when that would
    /// clip the layer's weights (the activation's grid is the coarser one).
    fn add_on_act_grid(&mut self, acc: &Rep, act: &Rep) -> Option<Rep> {
        let (Rep::Acc { v, .. }, Rep::Act { v: av, z, s }) = (acc, act) else {
            return None;
        };
        let src = self.linear.get(v)?.clone();
        if src.scales.len() != s.len() {
            return None;
        }
        let mut mul = Vec::with_capacity(s.len());
        for (&sc, &nat) in s.iter().zip(&src.scales) {
            let m = (sc / nat).floor();
            if !(1.0..=4096.0).contains(&m) {
                return None;
            }
            mul.push(m as u32);
        }
        let forced: Vec<f32> = s.iter().zip(&mul).map(|(s, &m)| s / m as f32).collect();
        let (op, ..) = self.linear_op(&src, false, Some(&forced));
        self.m.nodes[*v - 1].op = op;
        if mul.iter().all(|&m| m == mul[0]) {
            mul.truncate(1);
        }
        let out = self.push(Op::Add(Add { mul }), vec![*v, *av]);
        Some(Rep::Acc {
            v: out,
            a: forced,
            b: z.clone(),
        })
    }
}

/// The scale for weights on levels `-q-1..=q` with the least squared rounding error:
/// clipping the largest weights pays at low bit widths (ternary weights scaled by the
/// maximum would round most weights to zero).
fn weight_scale(ws: &[f32], q: f32) -> f32 {
    let absmax = ws.iter().fold(0f32, |m, w| m.max(w.abs()));
    if absmax <= 0.0 {
        return 1.0;
    }
    let err = |s: f32| -> f32 {
        ws.iter()
            .map(|w| {
                let r = w - s * (w / s).round().clamp(-q - 1.0, q);
                r * r
            })
            .sum()
    };
    (0..=70)
        .map(|i| absmax / q * (1.0 - i as f32 * 0.01))
        .min_by(|a, b| err(*a).total_cmp(&err(*b)))
        .unwrap()
}

/// `lo` + the number of t in lo..=hi for which the monotone predicate holds (it holds on a
/// prefix).
fn partition(lo: i64, hi: i64, pred: impl Fn(i64) -> bool) -> i64 {
    let (mut l, mut h) = (lo, hi + 1);
    while l < h {
        let mid = l + (h - l) / 2;
        if pred(mid) {
            l = mid + 1;
        } else {
            h = mid;
        }
    }
    l
}

/// Builds the integer model from a float graph and calibration ranges.
pub fn quantize(
    g: &FGraph,
    shapes: &[FShape],
    ranges: &Ranges,
    cfg: QuantConfig,
    name: &str,
) -> Result<Model, ImportError> {
    quantize_noted(g, shapes, ranges, cfg, name).map(|(m, _)| m)
}

/// [`quantize_noted`], with advice besides: the notes on activation quantizers whose
/// level spacing is near a power of two, and what that power of two would save (planned).
pub fn quantize_advised(
    g: &FGraph,
    shapes: &[FShape],
    ranges: &Ranges,
    cfg: QuantConfig,
    name: &str,
) -> Result<(Model, Vec<String>, Vec<String>), ImportError> {
    let b = build(g, shapes, ranges, cfg, name)?;
    let advice = b.pow2_advice();
    Ok((b.m, b.notes, advice))
}

/// [`quantize`], with notes on where the integer model departs from the quantizers and
/// quantized weights of the ONNX model (QDQ), per layer.
pub fn quantize_noted(
    g: &FGraph,
    shapes: &[FShape],
    ranges: &Ranges,
    cfg: QuantConfig,
    name: &str,
) -> Result<(Model, Vec<String>), ImportError> {
    build(g, shapes, ranges, cfg, name).map(|b| (b.m, b.notes))
}

/// The integer model, built node by node.
fn build<'a>(
    g: &FGraph,
    shapes: &[FShape],
    ranges: &'a Ranges,
    cfg: QuantConfig,
    name: &str,
) -> Result<Builder<'a>, ImportError> {
    cfg.check()?;
    let mut b = Builder::start(g, shapes, ranges, cfg, name)?;
    let input_q = b.input_quantizer(g, ranges)?;
    let [c, ..] = g.input;
    let mut pass = Pass {
        g,
        shapes,
        readers: vec![0; g.nodes.len() + 1],
        reps: vec![Rep::Act {
            v: 0,
            z: vec![b.m.input.zero; c],
            s: vec![b.m.input.scale; c],
        }],
        pending: Default::default(),
    };
    for n in &g.nodes {
        for &i in &n.inputs {
            pass.readers[i] += 1;
        }
    }
    for (n, node) in g.nodes.iter().enumerate() {
        let rep = if input_q == Some(n) {
            pass.reps[node.inputs[0]].clone()
        } else {
            b.node(&mut pass, n)?
        };
        pass.reps.push(rep);
    }
    if pass.reps[g.output].v() != b.m.nodes.len() {
        return Err(ImportError::Quantize(
            "the output is not the last layer".into(),
        ));
    }
    b.m.infer()?;
    Ok(b)
}

/// The float graph as `quantize_noted` walks it, node by node.
struct Pass<'g> {
    g: &'g FGraph,
    shapes: &'g [FShape],
    /// How many float nodes read each value: a linear layer can only be redone on another
    /// scale when its one reader is the residual Add.
    readers: Vec<usize>,
    /// The integer representation of each float value so far.
    reps: Vec<Rep>,
    /// Activation functions whose one reader is a quantizer: applied by its table.
    pending: std::collections::HashMap<usize, ActFn>,
}

impl<'a> Builder<'a> {
    /// An empty model whose input spans the calibration range of the input.
    fn start(
        g: &FGraph,
        shapes: &[FShape],
        ranges: &'a Ranges,
        cfg: QuantConfig,
        name: &str,
    ) -> Result<Self, ImportError> {
        let [c, h, w] = g.input;
        let (lo, hi) = input_range(ranges)?;
        let zero = lo.min(0.0);
        let top = ((1u32 << cfg.input_bits) - 1) as f32;
        let scale = if hi > zero { (hi - zero) / top } else { 1.0 };
        Ok(Builder {
            m: Model {
                format_version: MODEL_FORMAT_VERSION,
                name: name.to_string(),
                input: InputSpec {
                    channels: c,
                    height: h,
                    width: w,
                    bits: cfg.input_bits,
                    scale,
                    zero,
                },
                nodes: vec![],
                num_classes: shapes[g.output].len(),
            },
            cfg,
            ranges,
            linear: Default::default(),
            notes: vec![],
            pow2_alts: vec![],
        })
    }
}

/// The calibration range of the input over all channels.
fn input_range(ranges: &Ranges) -> Result<(f32, f32), ImportError> {
    let (lo, hi) = ranges[0]
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &(a, b)| {
            (l.min(a), h.max(b))
        });
    if !lo.is_finite() || !hi.is_finite() {
        return Err(ImportError::Quantize(
            "the calibration data is empty or not finite".into(),
        ));
    }
    Ok((lo, hi))
}

impl Builder<'_> {
    /// Takes a quantizer on the input (perhaps after Flatten) as the model's input
    /// quantization; returns its node, which then adds no layer.
    fn input_quantizer(
        &mut self,
        g: &FGraph,
        ranges: &Ranges,
    ) -> Result<Option<usize>, ImportError> {
        let quantized = g.nodes.iter().any(|n| matches!(n.op, FOp::Quant(_)));
        let input_q = g
            .nodes
            .iter()
            .enumerate()
            .find(|(_, n)| !matches!(n.op, FOp::Flatten(_)))
            .filter(|(k, n)| {
                n.inputs == [*k]
                    && g.nodes[..*k]
                        .iter()
                        .enumerate()
                        .all(|(j, m)| m.inputs == [j])
            })
            .and_then(|(k, n)| match n.op {
                FOp::Quant(q) => (q.levels() <= 1 << MAX_INPUT_BITS).then_some((k, q)),
                FOp::Conv(_)
                | FOp::Dense(_)
                | FOp::Act(_)
                | FOp::MaxPool(_)
                | FOp::AvgPool(_)
                | FOp::Add
                | FOp::Flatten(_) => None,
            });
        let Some((k, mut q)) = input_q else {
            if quantized {
                self.notes.push(format!(
                    "input: not quantized in the model; quantized to {} bits over the calibration range (approximation)",
                    self.cfg.input_bits
                ));
            }
            return Ok(None);
        };
        let (lo, _) = input_range(ranges)?;
        // Padding adds level 0, which must be the value 0.0 as in the ONNX model: for
        // non-negative images (as every camera frame is), the levels below zero are unused.
        if lo >= 0.0 && (q.qmin..q.qmax).contains(&q.zero) {
            q.qmin = q.zero;
        } else if q.zero != q.qmin {
            self.notes.push(
                "input: signed input quantizer; zero-padded borders read its level 0, not the value 0 (approximation at the borders of padded convolutions)".into(),
            );
        }
        let levels = q.levels() as u64;
        self.m.input.bits = (64 - (levels - 1).leading_zeros()).max(1) as u8;
        self.m.input.scale = q.scale;
        self.m.input.zero = q.scale * (q.qmin - q.zero) as f32;
        Ok(Some(k))
    }

    /// The integer layers of float node `n`: one function per kind.
    fn node(&mut self, pass: &mut Pass<'_>, n: usize) -> Result<Rep, ImportError> {
        let (g, node) = (pass.g, &pass.g.nodes[n]);
        let fv = n + 1;
        let x = pass.reps[node.inputs[0]].clone();
        let xs = pass.shapes[node.inputs[0]];
        let origin = node.origin.as_str();
        let last = fv == g.output;
        match &node.op {
            FOp::Conv(l) => {
                let x = self.ensure_act(x, node.inputs[0], origin)?;
                if let Rep::Act { z, .. } = &x {
                    if l.padding != [0, 0] && z.iter().any(|z| *z != 0.0) {
                        self.notes.push(format!(
                            "{origin}: zero padding reads level 0 of its input, the value {} and not 0 (approximation at the borders)",
                            z[0]
                        ));
                    }
                }
                let geometry = Some((l.kernel, l.stride, l.padding));
                let ws = l.weight_scale.as_deref();
                self.linear(
                    &x,
                    xs,
                    l.out_channels,
                    &l.weights,
                    &l.bias,
                    last,
                    geometry,
                    ws,
                    origin,
                )
            }
            FOp::Dense(l) => {
                let x = self.ensure_act(x, node.inputs[0], origin)?;
                let ws = l.weight_scale.as_deref();
                self.linear(
                    &x,
                    xs,
                    l.out_features,
                    &l.weights,
                    &l.bias,
                    last,
                    None,
                    ws,
                    origin,
                )
            }
            FOp::Act(f)
                if pass.readers[fv] == 1
                    && g.nodes
                        .get(fv)
                        .is_some_and(|m| matches!(m.op, FOp::Quant(_)) && m.inputs == [fv]) =>
            {
                pass.pending.insert(fv, *f);
                Ok(x)
            }
            FOp::Act(f) => {
                let (z, s) = self.act_params(&self.ranges[fv], self.cfg.act_bits);
                self.requantize(&x, *f, &z, &s, origin, false)
            }
            // a quantizer of the logits changes no class but makes ties: dropped
            FOp::Quant(_) if last && !pass.pending.contains_key(&node.inputs[0]) => {
                self.notes.push(format!(
                    "{origin}: the output's quantizer dropped (it is monotone: the class is the same except where it makes a tie)"
                ));
                Ok(x)
            }
            FOp::Quant(q) => {
                let f = pass
                    .pending
                    .remove(&node.inputs[0])
                    .unwrap_or(ActFn::Identity);
                self.requantize_spec(&x, f, *q, origin)
            }
            FOp::MaxPool(p) => {
                let Rep::Act { v, z, s } = self.ensure_act(x, node.inputs[0], origin)? else {
                    unreachable!()
                };
                let v = self.push(Op::MaxPool(p.clone()), vec![v]);
                Ok(Rep::Act { v, z, s })
            }
            FOp::AvgPool(p) => Ok(self.avg_pool(p, x)),
            FOp::Add => self.add(pass, node.inputs[0], node.inputs[1], origin),
            FOp::Flatten(f) => Ok(self.flatten(f, x, xs)),
        }
    }

    /// A sum pool, its 1/k folded into the accumulator's scale.
    fn avg_pool(&mut self, p: &SumPool, x: Rep) -> Rep {
        let k = (p.kernel[0] * p.kernel[1]) as f32;
        let (a, b) = x.affine();
        let v = self.push(Op::SumPool(p.clone()), vec![x.v()]);
        Rep::Acc {
            v,
            a: a.iter().map(|a| a / k).collect(),
            b,
        }
    }

    /// Both sides as activations on one per-channel grid, so the integer sum is the float
    /// sum on that grid.
    fn add(
        &mut self,
        pass: &Pass<'_>,
        i: usize,
        j: usize,
        origin: &str,
    ) -> Result<Rep, ImportError> {
        let (x, y) = (pass.reps[i].clone(), pass.reps[j].clone());
        let direct = match (&x, &y) {
            (Rep::Acc { .. }, Rep::Act { .. }) if pass.readers[i] == 1 => {
                self.add_on_act_grid(&x, &y)
            }
            (Rep::Act { .. }, Rep::Acc { .. }) if pass.readers[j] == 1 => {
                self.add_on_act_grid(&y, &x)
            }
            _ => None,
        };
        if let Some(r) = direct {
            return Ok(r);
        }
        let union: Vec<(f32, f32)> = self.ranges[i]
            .iter()
            .zip(&self.ranges[j])
            .map(|(p, q)| (p.0.min(q.0), p.1.max(q.1)))
            .collect();
        let (z, s) = self.act_params(&union, self.cfg.act_bits);
        let mut sides = Vec::with_capacity(2);
        for r in [x, y] {
            let same = matches!(&r, Rep::Act { z: rz, s: rs, .. } if *rz == z && *rs == s);
            sides.push(if same {
                r
            } else {
                self.requantize(&r, ActFn::Identity, &z, &s, origin, true)?
            });
        }
        let v = self.push(
            Op::Add(Add { mul: vec![] }),
            vec![sides[0].v(), sides[1].v()],
        );
        Ok(Rep::Acc {
            v,
            a: s,
            b: z.iter().map(|z| 2.0 * z).collect(),
        })
    }

    /// Flattening repeats each channel's parameters over its positions.
    fn flatten(&mut self, f: &Flatten, x: Rep, xs: FShape) -> Rep {
        let per = xs.len() / xs.channels();
        let expand = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter()
                .flat_map(|x| std::iter::repeat_n(x, per))
                .collect()
        };
        let v = self.push(Op::Flatten(f.clone()), vec![x.v()]);
        match x {
            Rep::Act { z, s, .. } => Rep::Act {
                v,
                z: expand(z),
                s: expand(s),
            },
            Rep::Acc { a, b, .. } => Rep::Acc {
                v,
                a: expand(a),
                b: expand(b),
            },
        }
    }
}
