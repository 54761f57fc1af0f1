//! The float network an ONNX file describes, reduced to the layers the engine has (BN
//! already folded, Identity/Dropout gone), with a plain float forward pass for calibration.

use fhecam_engine::fhe::geometry::{for_each_tap, pool_windows};
use fhecam_engine::layer::conv_shape;
use fhecam_engine::model::{Flatten, Kind, Layer, MaxPool, SumPool, ValueInfo};

/// Element-wise activation functions (all monotone non-decreasing: quantized, they become
/// monotone tables, so max pooling commutes with them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActFn {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
    /// Requantization only.
    Identity,
}

impl ActFn {
    pub fn apply(self, x: f32) -> f32 {
        match self {
            ActFn::Relu => x.max(0.0),
            ActFn::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            ActFn::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            ActFn::Tanh => x.tanh(),
            ActFn::Identity => x,
        }
    }
}

/// A uniform quantizer as ONNX writes one (QuantizeLinear, an optional Clip, then
/// DequantizeLinear): `q = clamp(round_half_even(x / scale) + zero, qmin, qmax)`, read back as
/// `(q - zero) · scale`. Per tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QSpec {
    pub scale: f32,
    pub zero: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl QSpec {
    /// The integer level of `x`, as ONNX QuantizeLinear computes it (float32 division,
    /// ties to even).
    pub fn level(&self, x: f32) -> i32 {
        let r = (x / self.scale).round_ties_even();
        // saturating: a NaN or huge value lands on an end, as ONNX saturates
        (r.clamp(i32::MIN as f32, i32::MAX as f32) as i64 + self.zero as i64)
            .clamp(self.qmin as i64, self.qmax as i64) as i32
    }
    pub fn fake(&self, x: f32) -> f32 {
        (self.level(x) - self.zero) as f32 * self.scale
    }
    pub fn levels(&self) -> u32 {
        (self.qmax - self.qmin) as u32 + 1
    }
}

/// A float layer. The weightless kinds are the engine's own layer types (same parameters,
/// same shape inference); the linear ones keep float weights until `quantize`, and share the
/// engine's geometry ([`conv_shape`]).
#[derive(Clone, Debug, PartialEq)]
pub enum FOp {
    Conv(FConv),
    Dense(FDense),
    Act(ActFn),
    /// A quantizer (QuantizeLinear → Clip → DequantizeLinear) on a computed value.
    Quant(QSpec),
    MaxPool(MaxPool),
    /// Average pooling: the engine's sum pool, divided by the window.
    AvgPool(SumPool),
    Add,
    Flatten(Flatten),
}

/// The float parameters of a layer with weights, where a following BatchNorm or bias folds in.
pub struct FLinearMut<'a> {
    pub weights: &'a mut Vec<f32>,
    pub bias: &'a mut Vec<f32>,
    pub weight_scale: &'a mut Option<Vec<f32>>,
}

impl FOp {
    /// The parameters of a layer with weights; `None` for the other kinds.
    pub fn linear_mut(&mut self) -> Option<FLinearMut<'_>> {
        match self {
            FOp::Conv(FConv {
                weights,
                bias,
                weight_scale,
                ..
            })
            | FOp::Dense(FDense {
                weights,
                bias,
                weight_scale,
                ..
            }) => Some(FLinearMut {
                weights,
                bias,
                weight_scale,
            }),
            FOp::Act(_)
            | FOp::Quant(_)
            | FOp::MaxPool(_)
            | FOp::AvgPool(_)
            | FOp::Add
            | FOp::Flatten(_) => None,
        }
    }
}

/// A float convolution: the engine's geometry ([`conv_shape`]) with float weights.
#[derive(Clone, Debug, PartialEq)]
pub struct FConv {
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    /// [out][in][kh][kw]
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    /// Quantized weights (DequantizeLinear): every weight is an integer times its output
    /// channel's scale here, taken as is instead of quantized again.
    pub weight_scale: Option<Vec<f32>>,
}

impl FConv {
    fn shape(&self, a: FShape) -> Result<FShape, String> {
        let (o, k) = (self.out_channels, self.kernel);
        if a.flat || self.weights.len() != o * a.chw[0] * k[0] * k[1] {
            return Err(format!(
                "weights for {} input channels, the input is {:?}",
                self.weights.len() / (o * k[0] * k[1]).max(1),
                a.chw
            ));
        }
        Ok(FShape {
            chw: conv_shape(&a.info(), o, k, self.stride, self.padding)?,
            flat: false,
        })
    }

    fn forward(&self, a: &[f32], ai: FShape, out: FShape) -> Vec<f32> {
        let ([c, h, w], [_, oh, ow]) = (ai.chw, out.chw);
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let mut out = Vec::with_capacity(self.out_channels * oh * ow);
        for o in 0..self.out_channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = self.bias[o];
                    for_each_tap(c, h, w, k, s, p, oy, ox, |ic, ky, kx, i| {
                        sum += self.weights[((o * c + ic) * k[0] + ky) * k[1] + kx] * a[i];
                    });
                    out.push(sum);
                }
            }
        }
        out
    }
}

/// A float fully connected layer.
#[derive(Clone, Debug, PartialEq)]
pub struct FDense {
    pub out_features: usize,
    /// [out][in]
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    pub weight_scale: Option<Vec<f32>>,
}

impl FDense {
    fn shape(&self, a: FShape) -> Result<FShape, String> {
        if self.weights.len() != self.out_features * a.len() {
            return Err(format!(
                "expects {} inputs, the input has {} values",
                self.weights.len() / self.out_features.max(1),
                a.len()
            ));
        }
        Ok(FShape {
            chw: [self.out_features, 1, 1],
            flat: true,
        })
    }

    fn forward(&self, a: &[f32]) -> Vec<f32> {
        let n = a.len();
        (0..self.out_features)
            .map(|o| {
                let row = &self.weights[o * n..(o + 1) * n];
                self.bias[o] + row.iter().zip(a).map(|(w, x)| w * x).sum::<f32>()
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FNode {
    pub op: FOp,
    /// Value ids: 0 is the input, k the output of node k-1.
    pub inputs: Vec<usize>,
    /// Where it came from, for messages: "Conv 'conv1'".
    pub origin: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FGraph {
    /// (C, H, W) of one sample.
    pub input: [usize; 3],
    /// The ONNX input is declared (N, H, W, C) (Keras through tf2onnx); fhecam's data are
    /// (N, C, H, W) all the same, and are transposed for the ONNX runtime.
    pub input_nhwc: bool,
    pub nodes: Vec<FNode>,
    /// Value id of the network output (logits).
    pub output: usize,
    /// Notes on what the import changed (folded BN, dropped trailing Softmax).
    pub notes: Vec<String>,
}

/// Shape of a value: (C, H, W), flat vectors as (n, 1, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FShape {
    pub chw: [usize; 3],
    pub flat: bool,
}

impl FShape {
    pub fn len(&self) -> usize {
        self.chw.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Channels in the engine's sense (a flat value has one per element).
    pub fn channels(&self) -> usize {
        self.chw[0]
    }
    pub fn info(&self) -> ValueInfo {
        ValueInfo {
            shape: self.chw,
            flat: self.flat,
            kind: Kind::Act { max: 0 },
        }
    }
    /// The output shape of an engine layer that takes this value.
    fn through(&self, layer: &impl Layer) -> Result<FShape, String> {
        let out = layer.infer(&[&self.info()])?;
        Ok(FShape {
            chw: out.shape,
            flat: out.flat,
        })
    }
}

impl FGraph {
    /// Shapes of all values; `Err((node index, message))` where a layer does not fit.
    pub fn shapes(&self) -> Result<Vec<FShape>, (usize, String)> {
        let mut shapes = vec![self.input_shape()];
        self.extend_shapes(&mut shapes)?;
        Ok(shapes)
    }

    pub fn input_shape(&self) -> FShape {
        FShape {
            chw: self.input,
            flat: false,
        }
    }

    /// Appends the shapes of the nodes after those `shapes` covers (it holds the input's
    /// and the first nodes'): a graph built node by node is shaped once, not per node.
    pub fn extend_shapes(&self, shapes: &mut Vec<FShape>) -> Result<(), (usize, String)> {
        for n in shapes.len() - 1..self.nodes.len() {
            let s = self.node_shape(n, shapes).map_err(|m| (n, m))?;
            shapes.push(s);
        }
        Ok(())
    }

    /// The shape of node `n`'s output, given the shapes of the values before it.
    fn node_shape(&self, n: usize, shapes: &[FShape]) -> Result<FShape, String> {
        let node = &self.nodes[n];
        let a = shapes[node.inputs[0]];
        Ok(match &node.op {
            FOp::Conv(l) => l.shape(a)?,
            FOp::Dense(l) => l.shape(a)?,
            FOp::MaxPool(p) => a.through(p)?,
            FOp::AvgPool(p) => a.through(p)?,
            FOp::Act(_) | FOp::Quant(_) => a,
            FOp::Add => {
                let b = shapes[node.inputs[1]];
                if a.len() != b.len() {
                    return Err(format!(
                        "adds tensors of different shapes {:?} and {:?}",
                        a.chw, b.chw
                    ));
                }
                a
            }
            FOp::Flatten(f) => a.through(f)?,
        })
    }

    /// All values of a forward pass on one sample (index 0 = the input).
    pub fn forward(&self, x: &[f32], shapes: &[FShape]) -> Vec<Vec<f32>> {
        let mut vals: Vec<Vec<f32>> = vec![x.to_vec()];
        for node in &self.nodes {
            let a = &vals[node.inputs[0]];
            let ai = shapes[node.inputs[0]];
            let out = match &node.op {
                FOp::Conv(l) => l.forward(a, ai, shapes[vals.len()]),
                FOp::Dense(l) => l.forward(a),
                FOp::Act(f) => a.iter().map(|&v| f.apply(v)).collect(),
                FOp::Quant(q) => a.iter().map(|&v| q.fake(v)).collect(),
                FOp::MaxPool(p) => pool_windows(&ai.info(), p.kernel, p.stride)
                    .iter()
                    .map(|win| win.iter().map(|&i| a[i]).fold(f32::NEG_INFINITY, f32::max))
                    .collect(),
                FOp::AvgPool(p) => pool_windows(&ai.info(), p.kernel, p.stride)
                    .iter()
                    .map(|win| win.iter().map(|&i| a[i]).sum::<f32>() / win.len() as f32)
                    .collect(),
                FOp::Add => a
                    .iter()
                    .zip(&vals[node.inputs[1]])
                    .map(|(x, y)| x + y)
                    .collect(),
                FOp::Flatten(_) => a.clone(),
            };
            vals.push(out);
        }
        vals
    }
}
