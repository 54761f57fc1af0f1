//! The integer network: a versioned, serde-serializable description of a quantized CNN.
//!
//! Values flowing between nodes are of two kinds:
//! - *activations*: small unsigned integers in `0..2^bits` (bits ≤ 4), the only thing a
//!   linear layer (Conv2d, Dense) may consume; the engine holds them as base-4 digits and
//!   multiplies digit by digit, one 4-bit PBS per (weight digit, activation digit) pair;
//! - *accumulators*: wide signed integers (sums of products plus a bias), turned back into
//!   activations by an `Activation` lookup table in which requantization is folded.
//!
//! BatchNorm has no node of its own: it is folded into the preceding linear layer before
//! anything is encrypted (see `import`/`train`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::lut::{GroupSum, Lut, LutNeuron};

/// Bumped whenever the serialized layout changes; older files are refused with a clear error.
pub const MODEL_FORMAT_VERSION: u32 = 1;

/// Largest activation width the encrypted engine handles. A product packs `4*w + x` in one
/// 4-bit block, so wider values are split into base-4 digits: a b-bit activation costs
/// ceil(b/2) PBS per multiply, a weight spanning more than 4 levels likewise.
pub const MAX_ACT_BITS: u8 = 4;

/// Largest input width: camera pixels may keep more levels than hidden activations (the
/// first layer pays one PBS per base-4 digit of them).
pub const MAX_INPUT_BITS: u8 = 8;

/// Largest number of levels a layer's weights may span (8-bit weights).
pub const MAX_WEIGHT_SPAN: i16 = 255;

#[derive(Debug, Error, PartialEq)]
pub enum ModelError {
    #[error("model format version {found} is not supported (this fhecam reads version {expected}); re-export the model with this version")]
    Version { found: u32, expected: u32 },
    #[error("node {node} ({op}): {msg}")]
    Node {
        node: usize,
        op: &'static str,
        msg: String,
    },
    #[error("model input: {0}")]
    Input(String),
    #[error("model output: {0}")]
    Output(String),
}

/// How a camera frame becomes the model's integer input.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Bits per input value (1..=4).
    pub bits: u8,
    /// A pixel intensity p in [0, 1] becomes clamp(round((p - zero) / scale), 0, 2^bits - 1).
    pub scale: f32,
    /// The value integer 0 stands for (imported models whose inputs are normalised).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zero: f32,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl InputSpec {
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Quantizes intensities in [0, 1] (row-major C,H,W) to the integer input.
    pub fn quantize(&self, pixels: &[f32]) -> Vec<u8> {
        let max = (1u32 << self.bits) - 1;
        pixels
            .iter()
            .map(|p| {
                // ties to even, as ONNX QuantizeLinear rounds
                (((p - self.zero) / self.scale)
                    .round_ties_even()
                    .clamp(0.0, max as f32)) as u8
            })
            .collect()
    }
}

/// A node's operation. Tensors are row-major (C, H, W) or flat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    Conv2d {
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        /// Layout [out][in][kh][kw]; every value within `weight_range`.
        weights: Vec<i8>,
        bias: Vec<i32>,
        /// Public bound on weights: the engine plans ranges from it, never from the values.
        weight_range: [i8; 2],
        /// Public bound on biases.
        bias_range: [i32; 2],
    },
    Dense {
        out_features: usize,
        /// Layout [out][in].
        weights: Vec<i8>,
        bias: Vec<i32>,
        weight_range: [i8; 2],
        bias_range: [i32; 2],
    },
    /// Sum over windows (average pooling with the 1/k folded into the next activation table).
    SumPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// Exact max over windows of activations.
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// Accumulator -> activation through a lookup table in which requantization is folded.
    /// One table for the whole tensor, or one per channel (folded BatchNorm and per-channel
    /// weight scales need that); the channel of element i is i / (H*W).
    Activation { bits: u8, tables: Vec<ActTable> },
    /// Element-wise `a + m·b` of two tensors of the same shape (residual connection); `m`
    /// is a clear positive integer, one for the tensor or one per channel of `b` (empty:
    /// 1), so a branch on a finer scale can be added exactly.
    Add {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mul: Vec<u32>,
    },
    /// (C, H, W) -> flat; a no-op on data.
    Flatten,
    /// A layer of secret lookup tables (`crate::lut`).
    Lut(Lut),
    /// The secret-table output layer: per-group class-score tables, summed (`crate::lut`).
    GroupSum(GroupSum),
}

/// The parameters a Conv2d or Dense layer has (what gets encrypted) and their public bounds.
pub struct Linear<'a> {
    pub weights: &'a [i8],
    pub bias: &'a [i32],
    pub weight_range: [i8; 2],
    pub bias_range: [i32; 2],
}

impl Op {
    /// Conv2d or Dense: the layers with (encrypted) weights.
    pub fn is_linear(&self) -> bool {
        matches!(self, Op::Conv2d { .. } | Op::Dense { .. })
    }

    /// A Conv2d's or Dense's weights, bias and bounds.
    pub fn linear(&self) -> Option<Linear<'_>> {
        match self {
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
            } => Some(Linear {
                weights,
                bias,
                weight_range: *weight_range,
                bias_range: *bias_range,
            }),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv2d { .. } => "conv2d",
            Op::Dense { .. } => "dense",
            Op::SumPool { .. } => "sum_pool",
            Op::MaxPool { .. } => "max_pool",
            Op::Activation { .. } => "activation",
            Op::Add { .. } => "add",
            Op::Flatten => "flatten",
            Op::Lut(_) => "lut",
            Op::GroupSum(_) => "group_sum",
        }
    }
}

/// `values[clamp(v - min, 0, len - 1)]`: inputs below/above the table clamp to its ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActTable {
    pub min: i64,
    pub values: Vec<u8>,
}

impl ActTable {
    pub fn lookup(&self, v: i64) -> u8 {
        self.values[(v - self.min).clamp(0, self.values.len() as i64 - 1) as usize]
    }
    /// Builds a table covering `lo..=hi` from a function.
    pub fn from_fn(lo: i64, hi: i64, f: impl Fn(i64) -> u8) -> Self {
        ActTable {
            min: lo,
            values: (lo..=hi).map(f).collect(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub op: Op,
    /// Value ids this node reads: 0 is the model input, k is the output of node k-1.
    pub inputs: Vec<usize>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub format_version: u32,
    pub name: String,
    pub input: InputSpec,
    pub nodes: Vec<Node>,
    /// Class names or count; the output value is the last node's (an accumulator of logits).
    pub num_classes: usize,
}

/// The static type of a value: its shape and whether it is an activation or an accumulator.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    /// (C, H, W); a flat vector is (n, 1, 1) with `flat` set.
    pub shape: [usize; 3],
    pub flat: bool,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Values in `0..=max`.
    Act { max: u8 },
    /// Values in `lo..=hi`.
    Acc { lo: i64, hi: i64 },
}

impl ValueInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Channel of element `i` (for a flat value, the element itself).
    pub fn channel_of(&self, i: usize) -> usize {
        i / (self.shape[1] * self.shape[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> (i64, i64) {
        match self.kind {
            Kind::Act { max } => (0, max as i64),
            Kind::Acc { lo, hi } => (lo, hi),
        }
    }
}

/// Output spatial size of a windowed op, or None when the window does not fit.
pub fn out_dim(inp: usize, k: usize, s: usize, p: usize) -> Option<usize> {
    if s == 0 || k == 0 || inp + 2 * p < k {
        return None;
    }
    Some((inp + 2 * p - k) / s + 1)
}

fn dot_range(n: usize, x_max: i64, w: [i8; 2], b: [i32; 2]) -> (i64, i64) {
    let (wl, wh) = (w[0] as i64, w[1] as i64);
    let lo = (wl * x_max).min(0) * n as i64 + b[0] as i64;
    let hi = (wh * x_max).max(0) * n as i64 + b[1] as i64;
    (lo, hi)
}

impl Model {
    /// Checks structure, shapes and bounds; returns the static type of every value
    /// (index 0 = input). Everything that loads a model calls this before using it.
    pub fn infer(&self) -> Result<Vec<ValueInfo>, ModelError> {
        let vals = self.infer_values()?;
        let last = vals.last().unwrap();
        if self.nodes.is_empty() || last.len() != self.num_classes || self.num_classes < 2 {
            return Err(ModelError::Output(format!(
                "the last node must produce num_classes = {} values (>= 2), got {}",
                self.num_classes,
                last.len()
            )));
        }
        Ok(vals)
    }

    /// Like `infer`, without requiring the last node to be the classifier.
    pub fn infer_values(&self) -> Result<Vec<ValueInfo>, ModelError> {
        if self.format_version != MODEL_FORMAT_VERSION {
            return Err(ModelError::Version {
                found: self.format_version,
                expected: MODEL_FORMAT_VERSION,
            });
        }
        let i = &self.input;
        if i.is_empty()
            || !(1..=MAX_INPUT_BITS).contains(&i.bits)
            || i.scale.is_nan()
            || i.scale <= 0.0
            || !i.zero.is_finite()
        {
            return Err(ModelError::Input(format!(
                "need non-empty C,H,W, bits in 1..={MAX_INPUT_BITS} and a positive scale (got {}x{}x{}, {} bits, scale {})",
                i.channels, i.height, i.width, i.bits, i.scale
            )));
        }
        let mut vals = vec![ValueInfo {
            shape: [i.channels, i.height, i.width],
            flat: false,
            kind: Kind::Act {
                max: ((1u16 << i.bits) - 1) as u8,
            },
        }];
        for (n, node) in self.nodes.iter().enumerate() {
            let err = |msg: String| ModelError::Node {
                node: n,
                op: node.op.name(),
                msg,
            };
            let want = if matches!(node.op, Op::Add { .. }) {
                2
            } else {
                1
            };
            if node.inputs.len() != want || node.inputs.iter().any(|&v| v > n) {
                return Err(err(format!(
                    "needs {want} input(s) among values 0..={n}, got {:?}",
                    node.inputs
                )));
            }
            let a = &vals[node.inputs[0]];
            let out = match &node.op {
                Op::Conv2d {
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    weights,
                    bias,
                    weight_range,
                    bias_range,
                } => {
                    let Kind::Act { max } = a.kind else {
                        return Err(err(
                            "input must be an activation (add an Activation node before it)".into(),
                        ));
                    };
                    if a.flat {
                        return Err(err("input is flat; conv2d needs (C,H,W)".into()));
                    }
                    let [c, h, w] = a.shape;
                    let (Some(oh), Some(ow)) = (
                        out_dim(h, kernel[0], stride[0], padding[0]),
                        out_dim(w, kernel[1], stride[1], padding[1]),
                    ) else {
                        return Err(err(format!(
                            "kernel {kernel:?} stride {stride:?} padding {padding:?} does not fit input {h}x{w}"
                        )));
                    };
                    check_params(
                        weights,
                        bias,
                        *out_channels * c * kernel[0] * kernel[1],
                        *out_channels,
                        *weight_range,
                        *bias_range,
                    )
                    .map_err(err)?;
                    let (lo, hi) = dot_range(
                        c * kernel[0] * kernel[1],
                        max as i64,
                        *weight_range,
                        *bias_range,
                    );
                    ValueInfo {
                        shape: [*out_channels, oh, ow],
                        flat: false,
                        kind: Kind::Acc { lo, hi },
                    }
                }
                Op::Dense {
                    out_features,
                    weights,
                    bias,
                    weight_range,
                    bias_range,
                } => {
                    let Kind::Act { max } = a.kind else {
                        return Err(err(
                            "input must be an activation (add an Activation node before it)".into(),
                        ));
                    };
                    let n_in = a.len();
                    check_params(
                        weights,
                        bias,
                        *out_features * n_in,
                        *out_features,
                        *weight_range,
                        *bias_range,
                    )
                    .map_err(err)?;
                    let (lo, hi) = dot_range(n_in, max as i64, *weight_range, *bias_range);
                    ValueInfo {
                        shape: [*out_features, 1, 1],
                        flat: true,
                        kind: Kind::Acc { lo, hi },
                    }
                }
                Op::SumPool { kernel, stride } | Op::MaxPool { kernel, stride } => {
                    pool_info(a, kernel, stride, matches!(node.op, Op::MaxPool { .. }))
                        .map_err(err)?
                }
                Op::Activation { bits, tables } => activation_info(a, bits, tables).map_err(err)?,
                Op::Add { mul } => add_info(a, &vals[node.inputs[1]], mul).map_err(err)?,
                Op::Flatten => ValueInfo {
                    shape: [a.len(), 1, 1],
                    flat: true,
                    kind: a.kind,
                },
                Op::Lut(l) => l.info(a).map_err(err)?,
                Op::GroupSum(g) => g.info(a).map_err(err)?,
            };
            if let Kind::Acc { lo, hi } = out.kind {
                if lo < -(1 << 40) || hi > 1 << 40 {
                    return Err(err(format!(
                        "accumulator range {lo}..={hi} is out of range"
                    )));
                }
            }
            vals.push(out);
        }
        crate::lut::check_multipliers(&self.nodes, &vals)?;
        Ok(vals)
    }

    /// Number of ciphertext x ciphertext multiply-accumulates (padding taps excluded).
    pub fn macs(&self) -> Result<u64, ModelError> {
        let vals = self.infer()?;
        let mut total = 0u64;
        for node in &self.nodes {
            let a = &vals[node.inputs[0]];
            total += match &node.op {
                Op::Conv2d {
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    ..
                } => {
                    let [c, h, w] = a.shape;
                    let taps = |len: usize, k: usize, s: usize, p: usize| -> u64 {
                        let o = out_dim(len, k, s, p).unwrap();
                        (0..o)
                            .map(|oi| {
                                (0..k)
                                    .filter(|&ki| {
                                        let i = (oi * s + ki) as i64 - p as i64;
                                        i >= 0 && (i as usize) < len
                                    })
                                    .count() as u64
                            })
                            .sum()
                    };
                    taps(h, kernel[0], stride[0], padding[0])
                        * taps(w, kernel[1], stride[1], padding[1])
                        * (*out_channels * c) as u64
                }
                Op::Dense { out_features, .. } => (a.len() * out_features) as u64,
                _ => 0,
            };
        }
        Ok(total)
    }
}

fn check_params(
    weights: &[i8],
    bias: &[i32],
    n_w: usize,
    n_b: usize,
    wr: [i8; 2],
    br: [i32; 2],
) -> Result<(), String> {
    if weights.len() != n_w || bias.len() != n_b {
        return Err(format!(
            "expected {n_w} weights and {n_b} biases, got {} and {}",
            weights.len(),
            bias.len()
        ));
    }
    if wr[0] > wr[1] || (wr[1] as i16 - wr[0] as i16) > MAX_WEIGHT_SPAN {
        return Err(format!(
            "weight_range {wr:?} must be ordered and span at most {} values (8-bit weights)",
            MAX_WEIGHT_SPAN + 1
        ));
    }
    if br[0] > br[1] || (br[1] as i64 - br[0] as i64) > 1 << 20 {
        return Err(format!("bias_range {br:?} is empty or wider than 2^20"));
    }
    if let Some(w) = weights.iter().find(|&&w| w < wr[0] || w > wr[1]) {
        return Err(format!("weight {w} lies outside weight_range {wr:?}"));
    }
    if let Some(b) = bias.iter().find(|&&b| b < br[0] || b > br[1]) {
        return Err(format!("bias {b} lies outside bias_range {br:?}"));
    }
    Ok(())
}

/// A pooling window's output: sum pooling widens the range by the window size; max
/// pooling needs and keeps an activation.
fn pool_info(
    a: &ValueInfo,
    kernel: &[usize; 2],
    stride: &[usize; 2],
    max: bool,
) -> Result<ValueInfo, String> {
    if a.flat {
        return Err("input is flat; pooling needs (C,H,W)".into());
    }
    let [c, h, w] = a.shape;
    let (Some(oh), Some(ow)) = (
        out_dim(h, kernel[0], stride[0], 0),
        out_dim(w, kernel[1], stride[1], 0),
    ) else {
        return Err(format!(
            "window {kernel:?} stride {stride:?} does not fit input {h}x{w}"
        ));
    };
    let k = (kernel[0] * kernel[1]) as i64;
    let kind = match (max, a.kind) {
        (true, Kind::Act { .. }) => a.kind,
        (true, Kind::Acc { .. }) => {
            return Err("max pooling needs activations: put it after the Activation node (max commutes with monotone activations)".into())
        }
        _ => {
            let (lo, hi) = a.range();
            Kind::Acc { lo: lo * k, hi: hi * k }
        }
    };
    Ok(ValueInfo {
        shape: [c, oh, ow],
        flat: false,
        kind,
    })
}

/// An activation's output: its tables (one, or one per channel) give the largest level.
fn activation_info(a: &ValueInfo, bits: &u8, tables: &[ActTable]) -> Result<ValueInfo, String> {
    if !(1..=MAX_ACT_BITS).contains(bits) {
        return Err(format!("bits must be 1..={MAX_ACT_BITS}, got {bits}"));
    }
    if tables.len() != 1 && tables.len() != a.shape[0] {
        return Err(format!(
            "needs 1 table or one per channel ({}), got {}",
            a.shape[0],
            tables.len()
        ));
    }
    let top = (1u8 << bits) - 1;
    for t in tables {
        if t.values.is_empty() || t.values.len() > 1 << 20 {
            return Err(format!("table length {} must be 1..=2^20", t.values.len()));
        }
        if let Some(v) = t.values.iter().find(|&&v| v > top) {
            return Err(format!("table value {v} exceeds {bits} bits"));
        }
        if t.min.abs() > 1 << 40 {
            return Err(format!("table start {} is out of range", t.min));
        }
    }
    Ok(ValueInfo {
        kind: Kind::Act {
            max: tables
                .iter()
                .flat_map(|t| t.values.iter().copied())
                .max()
                .unwrap(),
        },
        ..a.clone()
    })
}

/// `a + mul * b`, element-wise (per-channel multipliers of `b`).
fn add_info(a: &ValueInfo, b: &ValueInfo, mul: &[u32]) -> Result<ValueInfo, String> {
    if a.len() != b.len() || (a.shape != b.shape && !(a.flat || b.flat)) {
        return Err(format!("shapes differ: {:?} vs {:?}", a.shape, b.shape));
    }
    if !(mul.is_empty() || mul.len() == 1 || mul.len() == b.shape[0])
        || mul.iter().any(|&m| m == 0 || m > 1 << 16)
    {
        return Err(format!(
            "mul needs 1 or {} values in 1..=65536, got {mul:?}",
            b.shape[0]
        ));
    }
    let (mlo, mhi) = (
        *mul.iter().min().unwrap_or(&1) as i64,
        *mul.iter().max().unwrap_or(&1) as i64,
    );
    let ((al, ah), (bl, bh)) = (a.range(), b.range());
    Ok(ValueInfo {
        kind: Kind::Acc {
            lo: al + (mlo * bl).min(mhi * bl),
            hi: ah + (mlo * bh).max(mhi * bh),
        },
        ..a.clone()
    })
}
