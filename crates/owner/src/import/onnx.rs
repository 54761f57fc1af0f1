//! ONNX (as `torch.onnx.export` and tf2onnx write it) → [`FGraph`].
//!
//! The protobuf is decoded by tract-onnx's generated types; the graph is walked here so
//! that every node either maps onto a layer the engine runs or is refused by name.

use super::fold;
use super::graph::{ActFn, FConv, FDense, FGraph, FLinearMut, FNode, FOp, FShape, QSpec};
use super::ImportError;
use fhecam_engine::model::{Flatten, MaxPool, SumPool};
use std::collections::HashMap;
use tract_onnx::pb::{self, tensor_proto::DataType, NodeProto, TensorProto};
use tract_onnx::prelude::Framework;

/// Operators `fhecam import` maps onto the engine.
pub const SUPPORTED: &str = "Conv, Gemm, MatMul(+Add), Relu, LeakyRelu, Sigmoid, Tanh, \
AveragePool, GlobalAveragePool, MaxPool, BatchNormalization (after Conv/Gemm), Add, Flatten, \
Reshape (to [batch, -1]), Identity, Dropout, Constant, zero Pad, Transpose (NCHW <-> NHWC, as \
tf2onnx writes Keras models), QuantizeLinear / Clip / DequantizeLinear (QDQ and Brevitas QCDQ, \
at most 8-bit), a final Softmax (dropped: it does not change the predicted class), and \
Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Cast, Neg, Mul, Div, Add, Sub on constants \
(folded into constants before the layers are read)";

/// A constant: an initializer, a Constant node's value, or a node folded from constants.
#[derive(Clone, Debug)]
pub(super) struct Const {
    pub(super) dims: Vec<usize>,
    pub(super) f: Vec<f32>,
    /// The values of an integer type (empty for floats).
    pub(super) i: Vec<i64>,
    /// The ONNX data type (quantized integers keep theirs).
    pub(super) ty: i32,
    /// Dequantized from integers (DequantizeLinear), perhaps then transposed, reshaped or
    /// scaled: per element, the scale its value is an integer multiple of.
    pub(super) deq: Option<Vec<f32>>,
}

/// The integer range of a quantized ONNX type.
pub(super) fn int_range(ty: i32) -> Option<(i64, i64)> {
    match DataType::from_i32(ty) {
        Some(DataType::Int8) => Some((-128, 127)),
        Some(DataType::Uint8) => Some((0, 255)),
        Some(DataType::Int16) => Some((-32768, 32767)),
        Some(DataType::Uint16) => Some((0, 65535)),
        _ => None,
    }
}

#[derive(Clone, Debug)]
enum Sym {
    /// A value of the float graph.
    Val(usize),
    /// A value of the float graph after QuantizeLinear (and Clip): integers waiting for
    /// their DequantizeLinear.
    Quant(usize, QSpec),
    /// A value of the float graph that the ONNX graph holds transposed to (N, H, W, C), as
    /// tf2onnx writes Keras models: Transposes around the NCHW-only layers.
    Nhwc(usize),
    /// The (N, H·W·C) flattening of an NHWC value: the next Gemm/MatMul reads its columns
    /// in that order.
    FlatHwc(usize),
    Const(Const),
}

fn tensor(t: &TensorProto) -> Result<Const, String> {
    if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        return Err(format!(
            "tensor '{}' is stored in an external data file; re-export with the weights inside the .onnx",
            t.name
        ));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor '{}' has dimension {d}", t.name)))
        .collect::<Result<_, _>>()?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 28)
        .ok_or(format!("tensor '{}' is too large", t.name))?;
    let bad = || {
        format!(
            "tensor '{}' holds {} bytes for shape {dims:?}",
            t.name,
            t.raw_data.len()
        )
    };
    let (f, i) = tensor_values(t, n, &bad)?;
    if f.len() != n {
        return Err(bad());
    }
    Ok(Const {
        dims,
        f,
        i,
        ty: t.data_type,
        deq: None,
    })
}

/// The values of `n` little-endian numbers of `width` bytes, or why `raw` does not hold them.
fn le_values<T>(
    raw: &[u8],
    width: usize,
    n: usize,
    bad: &dyn Fn() -> String,
    f: impl Fn(&[u8]) -> T,
) -> Result<Vec<T>, String> {
    if raw.len() != width * n {
        return Err(bad());
    }
    Ok(raw.chunks_exact(width).map(f).collect())
}

/// A tensor's values as floats, and as integers for the integer types: from `raw_data`
/// when it is set, else from the typed field.
fn tensor_values(
    t: &TensorProto,
    n: usize,
    bad: &dyn Fn() -> String,
) -> Result<(Vec<f32>, Vec<i64>), String> {
    let raw = &t.raw_data;
    let ints = |i: Vec<i64>| (i.iter().map(|&v| v as f32).collect(), i);
    Ok(match DataType::from_i32(t.data_type) {
        Some(DataType::Float) if raw.is_empty() => (t.float_data.clone(), vec![]),
        Some(DataType::Float) => {
            let f = le_values(raw, 4, n, bad, |c| f32::from_le_bytes(c.try_into().unwrap()))?;
            (f, vec![])
        }
        Some(DataType::Double) if raw.is_empty() => {
            (t.double_data.iter().map(|&v| v as f32).collect(), vec![])
        }
        Some(DataType::Double) => {
            let f = le_values(raw, 8, n, bad, |c| {
                f64::from_le_bytes(c.try_into().unwrap()) as f32
            })?;
            (f, vec![])
        }
        Some(DataType::Int64) if raw.is_empty() => ints(t.int64_data.clone()),
        Some(DataType::Int64) => ints(le_values(raw, 8, n, bad, |c| {
            i64::from_le_bytes(c.try_into().unwrap())
        })?),
        Some(DataType::Int32) if raw.is_empty() => {
            ints(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        Some(DataType::Int32) => ints(le_values(raw, 4, n, bad, |c| {
            i32::from_le_bytes(c.try_into().unwrap()) as i64
        })?),
        Some(ty @ (DataType::Int8 | DataType::Uint8 | DataType::Int16 | DataType::Uint16)) => {
            ints(small_ints(t, ty, n, bad)?)
        }
        _ => {
            return Err(format!(
                "tensor '{}' has data type {} (read: float32/float64 weights, int8/uint8/int32 quantized tensors, int32/int64 shapes)",
                t.name, t.data_type
            ))
        }
    })
}

/// The values of an 8- or 16-bit integer tensor.
fn small_ints(
    t: &TensorProto,
    ty: DataType,
    n: usize,
    bad: &dyn Fn() -> String,
) -> Result<Vec<i64>, String> {
    let (lo, hi) = int_range(ty as i32).unwrap();
    if !t.raw_data.is_empty() {
        let w = if lo < -128 || hi > 255 { 2 } else { 1 };
        return le_values(&t.raw_data, w, n, bad, |c| match (ty, c) {
            (DataType::Int8, [b]) => *b as i8 as i64,
            (DataType::Uint8, [b]) => *b as i64,
            (DataType::Int16, [a, b]) => i16::from_le_bytes([*a, *b]) as i64,
            (_, [a, b]) => u16::from_le_bytes([*a, *b]) as i64,
            _ => unreachable!(),
        });
    }
    // small integer types are stored widened in int32_data: check the range
    let i: Vec<i64> = t.int32_data.iter().map(|&v| v as i64).collect();
    if let Some(v) = i.iter().find(|v| !(lo..=hi).contains(*v)) {
        return Err(format!(
            "tensor '{}' holds {v}, outside the {lo}..={hi} of its type {:?}",
            t.name, ty
        ));
    }
    Ok(i)
}

/// Scales, zero points, the zero point's type and the axis of a QuantizeLinear or
/// DequantizeLinear on `x`: one scale (per tensor) or one per index along `axis`.
fn qparams(
    op: &str,
    scale: Option<Const>,
    zero: Option<Const>,
    axis: i64,
    x: &Sym,
) -> Result<(Vec<f32>, Vec<i64>, i32, usize), String> {
    let scale = scale.ok_or(format!("{op} needs a constant scale"))?;
    if scale.f.is_empty() || scale.f.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(format!(
            "scale {:?}: scales must be positive and finite",
            scale.f
        ));
    }
    let rank = match x {
        Sym::Const(c) => c.dims.len(),
        _ => 4,
    };
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    if scale.f.len() > 1 && !(0..rank as i64).contains(&axis) {
        return Err(format!(
            "axis {axis} is outside the tensor's {rank} dimensions"
        ));
    }
    let (zeros, ty) = match zero {
        None => (vec![0; scale.f.len()], DataType::Uint8 as i32),
        // int32: a bias, dequantized with the product of its input's and weights' scales
        Some(z)
            if DataType::from_i32(z.ty) == Some(DataType::Int32) && matches!(x, Sym::Const(_)) =>
        {
            (z.i, z.ty)
        }
        Some(z) => {
            let Some((lo, hi)) = int_range(z.ty) else {
                return Err(format!(
                    "zero point of data type {}: fhecam reads int8 and uint8 quantizers",
                    z.ty
                ));
            };
            if hi - lo > 255 {
                return Err(format!(
                    "a 16-bit quantizer ({lo}..={hi}): fhecam reads quantizers of at most 8 bits (train with 8 bits or fewer)"
                ));
            }
            (z.i, z.ty)
        }
    };
    if zeros.len() != scale.f.len() {
        return Err(format!(
            "{} zero points for {} scales",
            zeros.len(),
            scale.f.len()
        ));
    }
    if let Sym::Const(c) = x {
        if scale.f.len() > 1 && c.dims.get(axis as usize) != Some(&scale.f.len()) {
            return Err(format!(
                "{} scales along axis {axis} of a tensor of shape {:?}",
                scale.f.len(),
                c.dims
            ));
        }
    }
    Ok((scale.f, zeros, ty, axis.max(0) as usize))
}

/// Index along `axis` of element `k` of a row-major tensor of `dims` (0 when per tensor).
fn along(dims: &[usize], axis: usize, k: usize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let stride: usize = dims[axis + 1..].iter().product();
    (k / stride) % dims[axis]
}

/// The per-output scale of dequantized weights whose output index runs along `out_axis`
/// (`None`: not dequantized, or one output's weights on several scales).
fn out_scales(w: &Const, out_axis: usize, out: usize) -> Option<Vec<f32>> {
    let s = w.deq.as_ref()?;
    if w.dims.get(out_axis) != Some(&out) || s.len() != w.f.len() {
        return None;
    }
    let mut per: Vec<Option<f32>> = vec![None; out];
    for (k, &v) in s.iter().enumerate() {
        let o = &mut per[along(&w.dims, out_axis, k, out)];
        match *o {
            None => *o = Some(v),
            Some(p) if p == v => {}
            Some(_) => return None,
        }
    }
    per.into_iter().collect()
}

pub(super) struct Attrs<'a>(pub(super) &'a NodeProto);

impl Attrs<'_> {
    pub(super) fn get(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.0.attribute.iter().find(|a| a.name == name)
    }
    pub(super) fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }
    pub(super) fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }
    pub(super) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    pub(super) fn string(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

fn pair(v: Option<Vec<i64>>, default: usize, what: &str) -> Result<[usize; 2], String> {
    match v.as_deref() {
        None => Ok([default; 2]),
        Some([a, b]) if *a >= 0 && *b >= 0 => Ok([*a as usize, *b as usize]),
        Some(other) => Err(format!(
            "{what} {other:?}: only 2-D (height, width) is supported"
        )),
    }
}

/// One ONNX node being mapped: its inputs resolved against the values defined before it.
struct NodeCx<'a> {
    node: &'a NodeProto,
    /// `<op> '<name>'` (or `#<index>`), for messages and the layers it becomes.
    origin: String,
    syms: &'a HashMap<String, Sym>,
    /// How many nodes read each name: folding BN or a bias into a layer needs sole
    /// ownership.
    uses: &'a HashMap<&'a str, usize>,
    /// Shapes of the graph's values so far.
    shapes: &'a [FShape],
    a: Attrs<'a>,
}

impl NodeCx<'_> {
    fn invalid(&self, msg: String) -> ImportError {
        ImportError::Node {
            node: self.origin.clone(),
            msg,
        }
    }

    fn sym(&self, k: usize) -> Result<&Sym, ImportError> {
        let name = self
            .node
            .input
            .get(k)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| self.invalid(format!("input {k} is missing")))?;
        self.syms.get(name).ok_or_else(|| {
            self.invalid(format!(
                "input '{name}' is not produced by any earlier node"
            ))
        })
    }

    /// Input `k` as a value computed from the image.
    fn val(&self, k: usize) -> Result<usize, ImportError> {
        match self.sym(k)? {
            Sym::Val(v) => Ok(*v),
            Sym::Const(_) => Err(self.invalid(format!(
                "input {k} is a constant; fhecam needs it computed from the image"
            ))),
            Sym::Nhwc(_) | Sym::FlatHwc(_) => Err(self.invalid(format!(
                "input {k} is in (N, H, W, C) layout here; fhecam reads NHWC tensors only through Transpose, activations, Add and Flatten/Reshape before a Gemm/MatMul"
            ))),
            Sym::Quant(..) => Err(self.invalid(format!(
                "input {k} is a quantized integer tensor; fhecam reads QuantizeLinear only followed by (Clip and) DequantizeLinear"
            ))),
        }
    }

    /// Input `k` as a constant (`None`: an optional input left out).
    fn konst(&self, k: usize) -> Result<Option<Const>, ImportError> {
        if self.node.input.get(k).is_none_or(|n| n.is_empty()) {
            return Ok(None);
        }
        match self.sym(k)? {
            Sym::Const(c) => Ok(Some(c.clone())),
            _ => Err(self.invalid(format!(
                "input {k} must be a constant (weights are fixed at import)"
            ))),
        }
    }

    /// All inputs as constants (`None` for an optional input left out), when every given
    /// input is one: the node is then folded into a constant.
    fn const_inputs(&self) -> Result<Option<Vec<Option<Const>>>, ImportError> {
        let mut ins = Vec::with_capacity(self.node.input.len());
        for (k, name) in self.node.input.iter().enumerate() {
            if name.is_empty() {
                ins.push(None);
                continue;
            }
            match self.sym(k)? {
                Sym::Const(c) => ins.push(Some(c.clone())),
                _ => return Ok(None),
            }
        }
        Ok(ins.iter().any(Option::is_some).then_some(ins))
    }

    /// Scales, zero points, their type and the axis of a QuantizeLinear/DequantizeLinear.
    #[allow(clippy::type_complexity)]
    fn qparams(&self) -> Result<(Vec<f32>, Vec<i64>, i32, usize), ImportError> {
        qparams(
            &self.node.op_type,
            self.konst(1)?,
            self.konst(2)?,
            self.a.int("axis", 1),
            self.sym(0)?,
        )
        .map_err(|m| self.invalid(m))
    }

    /// Appends a layer made from this node; returns its value's index.
    fn push(&self, g: &mut FGraph, op: FOp, inputs: Vec<usize>) -> usize {
        g.nodes.push(FNode {
            op,
            inputs,
            origin: self.origin.clone(),
        });
        g.nodes.len()
    }
}

/// The model's graph: at least one node, under a supported opset.
fn decode(bytes: &[u8]) -> Result<pb::GraphProto, ImportError> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| ImportError::Decode(format!("{e:#}")))?;
    for o in &proto.opset_import {
        if (o.domain.is_empty() || o.domain == "ai.onnx") && !(7..=21).contains(&o.version) {
            return Err(ImportError::Decode(format!(
                "opset {} is outside the supported 7..=21 (export with opset_version=13..18)",
                o.version
            )));
        }
    }
    let graph = proto
        .graph
        .ok_or_else(|| ImportError::Decode("the model has no graph".into()))?;
    if graph.node.is_empty() {
        return Err(ImportError::Decode(
            "the graph has no nodes (is this an ONNX model?)".into(),
        ));
    }
    Ok(graph)
}

/// The one input that is not an initializer: its name, its (C, H, W), and whether it is
/// declared (N, H, W, C) and transposed to NCHW first thing (as tf2onnx writes Keras models).
fn image_input<'g>(
    graph: &'g pb::GraphProto,
    syms: &HashMap<String, Sym>,
) -> Result<(&'g pb::ValueInfoProto, [usize; 3], bool), ImportError> {
    let real_inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !syms.contains_key(&i.name))
        .collect();
    let [input] = real_inputs[..] else {
        return Err(ImportError::Decode(format!(
            "the model has {} inputs; fhecam needs exactly one image input",
            real_inputs.len()
        )));
    };
    let dims: Vec<Option<i64>> = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => {
                            Some(v)
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        None => vec![],
    };
    let nhwc = graph
        .node
        .iter()
        .filter(|n| n.input.contains(&input.name))
        .all(|n| {
            n.op_type == "Transpose" && Attrs(n).ints("perm").as_deref() == Some(&[0, 3, 1, 2][..])
        });
    let chw = match dims[..] {
        [_, Some(h), Some(w), Some(c)] if nhwc => [c as usize, h as usize, w as usize],
        [_, Some(c), Some(h), Some(w)] if !nhwc => [c as usize, h as usize, w as usize],
        _ => {
            return Err(ImportError::Decode(format!(
                "input '{}' has shape {:?}; fhecam needs (batch, C, H, W) with fixed C, H, W (the batch axis may be dynamic)",
                input.name, dims
            )))
        }
    };
    Ok((input, chw, nhwc))
}

/// Decodes an ONNX model and maps it onto the engine's layers.
pub fn parse(bytes: &[u8]) -> Result<FGraph, ImportError> {
    let graph = &decode(bytes)?;
    let mut syms: HashMap<String, Sym> = HashMap::new();
    for t in &graph.initializer {
        let c = tensor(t).map_err(ImportError::Decode)?;
        syms.insert(t.name.clone(), Sym::Const(c));
    }
    let (input, chw, nhwc) = image_input(graph, &syms)?;
    syms.insert(
        input.name.clone(),
        if nhwc { Sym::Nhwc(0) } else { Sym::Val(0) },
    );
    let uses = name_uses(graph);
    let [output] = &graph.output[..] else {
        return Err(ImportError::Decode(format!(
            "the model has {} outputs; fhecam needs exactly one (the class scores)",
            graph.output.len()
        )));
    };

    let mut g = FGraph {
        input: chw,
        input_nhwc: nhwc,
        nodes: vec![],
        output: 0,
        notes: vec![],
    };
    let mut shapes = vec![g.input_shape()];
    for (idx, node) in graph.node.iter().enumerate() {
        let origin = if node.name.is_empty() {
            format!("{} #{idx}", node.op_type)
        } else {
            format!("{} '{}'", node.op_type, node.name)
        };
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(ImportError::Unsupported {
                op: format!("{}:{}", node.domain, node.op_type),
                node: origin,
            });
        }
        // the layers the previous node added
        g.extend_shapes(&mut shapes).map_err(shape_error(&g))?;
        let cx = NodeCx {
            node,
            origin,
            syms: &syms,
            uses: &uses,
            shapes: &shapes,
            a: Attrs(node),
        };
        let result = node_sym(&cx, &mut g, &output.name)?;
        // the single output name this node defines
        let out_name = node.output.first().cloned().unwrap_or_default();
        syms.insert(out_name, result);
    }
    g.output = output_value(&g, &syms, &output.name)?;
    g.shapes().map_err(shape_error(&g))?;
    Ok(g)
}

/// How many nodes (and graph outputs) read each name: folding BN or a bias into a layer
/// needs sole ownership.
fn name_uses(graph: &pb::GraphProto) -> HashMap<&str, usize> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    uses
}

/// A shape error of node `n`, named by where the node came from.
fn shape_error(g: &FGraph) -> impl Fn((usize, String)) -> ImportError + '_ {
    |(n, msg)| ImportError::Node {
        node: g.nodes[n].origin.clone(),
        msg,
    }
}

/// What one ONNX node computes: one function per operator.
fn node_sym(cx: &NodeCx, g: &mut FGraph, output: &str) -> Result<Sym, ImportError> {
    if fold::FOLDED.contains(&cx.node.op_type.as_str()) {
        if let Some(ins) = cx.const_inputs()? {
            return fold::fold(cx.node, &ins)
                .map(Sym::Const)
                .map_err(|m| cx.invalid(m));
        }
    }
    Ok(match cx.node.op_type.as_str() {
        "Identity" | "Dropout" => cx.sym(0)?.clone(),
        "Constant" => constant(cx)?,
        "Conv" => conv(cx, g)?,
        "Gemm" | "MatMul" => gemm(cx, g)?,
        "BatchNormalization" => batch_norm(cx, g)?,
        "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" => activation(cx, g)?,
        "MaxPool" | "AveragePool" => pool(cx, g)?,
        "GlobalAveragePool" => global_average_pool(cx, g)?,
        "Pad" => pad(cx)?,
        "Transpose" => transpose(cx)?,
        "Flatten" | "Reshape" if matches!(cx.sym(0)?, Sym::Nhwc(_)) => flatten_nhwc(cx)?,
        "Flatten" => flatten(cx, g)?,
        "Reshape" => reshape(cx, g)?,
        "Add" => add(cx, g)?,
        "QuantizeLinear" => quantize_linear(cx)?,
        "Clip" => clip(cx)?,
        "DequantizeLinear" => dequantize_linear(cx, g)?,
        "Softmax" | "LogSoftmax" if cx.node.output.first().map(String::as_str) == Some(output) => {
            g.notes.push(format!("{}: final {} dropped (the predicted class is the same; logits are reported instead of probabilities)", cx.origin, cx.node.op_type));
            cx.sym(0)?.clone()
        }
        other => {
            return Err(ImportError::Unsupported {
                op: other.to_string(),
                node: cx.origin.clone(),
            })
        }
    })
}

/// The value the graph output names: the last layer's.
fn output_value(
    g: &FGraph,
    syms: &HashMap<String, Sym>,
    output: &str,
) -> Result<usize, ImportError> {
    let v = match syms.get(output) {
        Some(Sym::Val(v) | Sym::Nhwc(v)) => *v,
        _ => {
            return Err(ImportError::Decode(format!(
                "output '{output}' is not computed from the input"
            )))
        }
    };
    if v != g.nodes.len() {
        return Err(ImportError::Decode(format!(
            "output '{output}' is not the last layer (value {v} of {})",
            g.nodes.len()
        )));
    }
    Ok(v)
}

/// A Constant node's value: a tensor, or a float/int scalar or list.
fn constant(cx: &NodeCx) -> Result<Sym, ImportError> {
    let list = |f: Vec<f32>, i: Vec<i64>, ty: DataType, scalar: bool| Const {
        dims: if scalar { vec![] } else { vec![f.len()] },
        f,
        i,
        ty: ty as i32,
        deq: None,
    };
    let ints = |i: Vec<i64>, scalar| {
        let f = i.iter().map(|&v| v as f32).collect();
        list(f, i, DataType::Int64, scalar)
    };
    let a = |name| cx.a.get(name);
    Ok(Sym::Const(
        if let Some(t) = a("value").and_then(|v| v.t.as_ref()) {
            tensor(t).map_err(|m| cx.invalid(m))?
        } else if let Some(v) = a("value_float") {
            list(vec![v.f], vec![], DataType::Float, true)
        } else if let Some(v) = a("value_floats") {
            list(v.floats.clone(), vec![], DataType::Float, false)
        } else if let Some(v) = a("value_int") {
            ints(vec![v.i], true)
        } else if let Some(v) = a("value_ints") {
            ints(v.ints.clone(), false)
        } else {
            return Err(cx.invalid(
                "only Constant with a tensor, float(s) or int(s) value is supported".into(),
            ));
        },
    ))
}

/// A 2-D convolution: weights [out, in, kh, kw], symmetric padding, no groups or dilation.
fn conv(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let x = cx.val(0)?;
    let w = cx
        .konst(1)?
        .ok_or_else(|| cx.invalid("weights are missing".into()))?;
    let [o, ci, kh, kw] = w.dims[..] else {
        return Err(cx.invalid(format!(
            "weights of shape {:?}; only 2-D convolutions are supported",
            w.dims
        )));
    };
    if cx.a.int("group", 1) != 1 {
        return Err(cx.invalid(format!(
            "group = {}: grouped/depthwise convolution is not supported",
            cx.a.int("group", 1)
        )));
    }
    if pair(cx.a.ints("dilations"), 1, "dilations").map_err(|m| cx.invalid(m))? != [1, 1] {
        return Err(cx.invalid("dilated convolution is not supported".into()));
    }
    let stride = pair(cx.a.ints("strides"), 1, "strides").map_err(|m| cx.invalid(m))?;
    let padding = match (
        cx.a.string("auto_pad").as_deref(),
        cx.a.ints("pads").as_deref(),
    ) {
        (None | Some("NOTSET") | Some(""), None) | (Some("VALID"), _) => [0, 0],
        (None | Some("NOTSET") | Some(""), Some([t, l, b, r]))
            if t == b && l == r && *t >= 0 && *l >= 0 =>
        {
            [*t as usize, *l as usize]
        }
        (Some("SAME_UPPER" | "SAME_LOWER"), _)
            if kh % 2 == 1 && kw % 2 == 1 && stride == [1, 1] =>
        {
            [kh / 2, kw / 2]
        }
        (ap, pads) => {
            return Err(cx.invalid(format!(
                "padding auto_pad={ap:?} pads={pads:?}: only symmetric padding is supported"
            )))
        }
    };
    let c = cx.shapes[x].chw[0];
    if cx.shapes[x].flat || ci != c {
        return Err(cx.invalid(format!(
            "weights expect {ci} input channels, the input is {:?}",
            cx.shapes[x].chw
        )));
    }
    let bias = match cx.konst(2)? {
        Some(b) if b.f.len() == o => b.f,
        Some(b) => return Err(cx.invalid(format!("bias has {} values for {o} filters", b.f.len()))),
        None => vec![0.0; o],
    };
    let weight_scale = out_scales(&w, 0, o);
    Ok(Sym::Val(cx.push(
        g,
        FOp::Conv(FConv {
            out_channels: o,
            kernel: [kh, kw],
            stride,
            padding,
            weights: w.f,
            bias,
            weight_scale,
        }),
        vec![x],
    )))
}

/// A dense layer; columns of an NHWC flattening are reordered to (C, H, W).
fn gemm(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let (x, hwc) = match cx.sym(0)? {
        Sym::FlatHwc(v) => (*v, true),
        _ => (cx.val(0)?, false),
    };
    let w = cx
        .konst(1)?
        .ok_or_else(|| cx.invalid("weights are missing".into()))?;
    let gemm = cx.node.op_type == "Gemm";
    let (ta, tb) = if gemm {
        (cx.a.int("transA", 0), cx.a.int("transB", 0))
    } else {
        (0, 0)
    };
    let (alpha, beta) = if gemm {
        (cx.a.float("alpha", 1.0), cx.a.float("beta", 1.0))
    } else {
        (1.0, 1.0)
    };
    if ta != 0 {
        return Err(cx.invalid("transA = 1 is not supported".into()));
    }
    let [r, c] = w.dims[..] else {
        return Err(cx.invalid(format!("weights of shape {:?}; need a matrix", w.dims)));
    };
    // engine layout [out][in]
    let (out, inp) = if tb != 0 { (r, c) } else { (c, r) };
    if cx.shapes[x].len() != inp {
        return Err(cx.invalid(format!(
            "weights expect {inp} inputs, the input has {} values ({:?})",
            cx.shapes[x].len(),
            cx.shapes[x].chw
        )));
    }
    let weights: Vec<f32> = (0..out)
        .flat_map(|o| (0..inp).map(move |i| (o, i)))
        .map(|(o, i)| {
            alpha
                * if tb != 0 {
                    w.f[o * inp + i]
                } else {
                    w.f[i * out + o]
                }
        })
        .collect();
    let bias = match cx.konst(2)? {
        Some(b) if b.f.len() == out => b.f.iter().map(|v| beta * v).collect(),
        Some(b) if b.f.len() == 1 => vec![beta * b.f[0]; out],
        Some(b) => {
            return Err(cx.invalid(format!("bias has {} values for {out} outputs", b.f.len())))
        }
        None => vec![0.0; out],
    };
    // columns of an NHWC flattening, reordered to the engine's (C, H, W) order
    let weights = if hwc {
        let [c, h, w] = cx.shapes[x].chw;
        let col = |i: usize| {
            let (ch, y, xx) = (i / (h * w), (i / w) % h, i % w);
            (y * w + xx) * c + ch
        };
        (0..out)
            .flat_map(|o| (0..inp).map(move |i| (o, i)))
            .map(|(o, i)| weights[o * inp + col(i)])
            .collect()
    } else {
        weights
    };
    let weight_scale = out_scales(&w, if tb != 0 { 0 } else { 1 }, out)
        .map(|s| s.iter().map(|s| s * alpha.abs()).collect())
        .filter(|_| alpha != 0.0);
    let x = if cx.shapes[x].flat {
        x
    } else {
        cx.push(g, FOp::Flatten(Flatten {}), vec![x])
    };
    Ok(Sym::Val(cx.push(
        g,
        FOp::Dense(FDense {
            out_features: out,
            weights,
            bias,
            weight_scale,
        }),
        vec![x],
    )))
}

/// Folded into the Conv or Gemm right before it, whose output nothing else reads.
fn batch_norm(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let x = cx.val(0)?;
    let p: Vec<Const> = (1..5)
        .map(|k| {
            cx.konst(k)?
                .ok_or_else(|| cx.invalid(format!("parameter {k} is missing")))
        })
        .collect::<Result<_, _>>()?;
    let eps = cx.a.float("epsilon", 1e-5);
    let c = cx.shapes[x].channels();
    if p.iter().any(|t| t.f.len() != c) {
        return Err(cx.invalid(format!("parameters do not have {c} channels")));
    }
    let sole = cx.node.input[0].as_str();
    let owner = x
        .checked_sub(1)
        .filter(|_| cx.uses.get(sole) == Some(&1))
        .and_then(|n| g.nodes[n].op.linear_mut());
    let Some(FLinearMut {
        weights,
        bias,
        weight_scale,
    }) = owner
    else {
        return Err(cx.invalid(
            "BatchNormalization must directly follow a Conv or Gemm whose output nothing else reads (it is folded into that layer)".into(),
        ));
    };
    let per = weights.len() / c;
    for ch in 0..c {
        let k = p[0].f[ch] / (p[3].f[ch] + eps).sqrt();
        // quantized weights stay integers, on a scale |k| times theirs
        // (a negative k negates them)
        if let Some(ws) = weight_scale.as_mut() {
            ws[ch] *= k.abs();
            if k == 0.0 || !k.is_finite() {
                *weight_scale = None;
            }
        }
        for w in &mut weights[ch * per..(ch + 1) * per] {
            *w *= k;
        }
        bias[ch] = (bias[ch] - p[2].f[ch]) * k + p[1].f[ch];
    }
    if !g.notes.iter().any(|n| n.starts_with("BatchNormalization")) {
        g.notes
            .push("BatchNormalization folded into the preceding layer's weights and bias".into());
    }
    Ok(Sym::Val(x))
}

/// An activation (a table lookup once quantized).
fn activation(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let f = match cx.node.op_type.as_str() {
        "Relu" => ActFn::Relu,
        "LeakyRelu" => ActFn::LeakyRelu(cx.a.float("alpha", 0.01)),
        "Sigmoid" => ActFn::Sigmoid,
        _ => ActFn::Tanh,
    };
    Ok(match cx.sym(0)? {
        Sym::Nhwc(v) => Sym::Nhwc(cx.push(g, FOp::Act(f), vec![*v])),
        _ => Sym::Val(cx.push(g, FOp::Act(f), vec![cx.val(0)?])),
    })
}

/// Unpadded 2-D pooling.
fn pool(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let x = cx.val(0)?;
    let kernel = pair(cx.a.ints("kernel_shape"), 0, "kernel_shape").map_err(|m| cx.invalid(m))?;
    let stride = pair(cx.a.ints("strides"), 1, "strides").map_err(|m| cx.invalid(m))?;
    if cx.a.ints("pads").is_some_and(|p| p.iter().any(|&v| v != 0))
        || cx
            .a
            .string("auto_pad")
            .is_some_and(|s| s != "NOTSET" && s != "VALID" && !s.is_empty())
    {
        return Err(cx.invalid("padded pooling is not supported".into()));
    }
    if cx.a.int("ceil_mode", 0) != 0 {
        return Err(cx.invalid("ceil_mode = 1 is not supported".into()));
    }
    if pair(cx.a.ints("dilations"), 1, "dilations").map_err(|m| cx.invalid(m))? != [1, 1] {
        return Err(cx.invalid("dilated pooling is not supported".into()));
    }
    if cx.node.output.len() > 1 && !cx.node.output[1].is_empty() {
        return Err(cx.invalid("MaxPool indices output is not supported".into()));
    }
    let op = if cx.node.op_type == "MaxPool" {
        FOp::MaxPool(MaxPool { kernel, stride })
    } else {
        FOp::AvgPool(SumPool { kernel, stride })
    };
    Ok(Sym::Val(cx.push(g, op, vec![x])))
}

/// Average pooling over the whole map.
fn global_average_pool(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let x = cx.val(0)?;
    let [_, h, w] = cx.shapes[x].chw;
    Ok(Sym::Val(cx.push(
        g,
        FOp::AvgPool(SumPool {
            kernel: [h, w],
            stride: [1, 1],
        }),
        vec![x],
    )))
}

/// Zero padding only (torch writes it before AveragePool): a no-op.
fn pad(cx: &NodeCx) -> Result<Sym, ImportError> {
    // torch exports AvgPool2d as a zero Pad before AveragePool
    let pads = match cx.konst(1)? {
        Some(p) => p.i,
        None => cx.a.ints("pads").unwrap_or_default(),
    };
    if pads.iter().any(|&p| p != 0) {
        return Err(cx.invalid(format!(
            "pads {pads:?}: only zero padding (a no-op) is supported; pad inside Conv instead"
        )));
    }
    Ok(Sym::Val(cx.val(0)?))
}

/// The NCHW <-> NHWC transposes tf2onnx writes around image layers.
fn transpose(cx: &NodeCx) -> Result<Sym, ImportError> {
    let perm = cx.a.ints("perm").unwrap_or_default();
    Ok(match (cx.sym(0)?, perm.as_slice()) {
            (Sym::Nhwc(v), [0, 3, 1, 2]) => Sym::Val(*v),
            (Sym::Val(v), [0, 2, 3, 1]) if !cx.shapes[*v].flat => Sym::Nhwc(*v),
            _ => {
                return Err(cx.invalid(format!(
                    "perm {perm:?}: only the NCHW <-> NHWC transposes tf2onnx writes around image layers are supported"
                )))
            }
        })
}

/// Flattening an NHWC tensor: the next dense layer reorders its columns.
fn flatten_nhwc(cx: &NodeCx) -> Result<Sym, ImportError> {
    let Sym::Nhwc(v) = cx.sym(0)? else {
        unreachable!()
    };
    let n = cx.shapes[*v].len() as i64;
    let flat = match cx.node.op_type.as_str() {
        "Flatten" => cx.a.int("axis", 1) == 1,
        _ => cx
            .konst(1)?
            .is_some_and(|t| matches!(t.i[..], [_, d] if d == -1 || d == n)),
    };
    if !flat {
        return Err(cx.invalid(format!("only flattening to (batch, {n}) is supported")));
    }
    Ok(Sym::FlatHwc(*v))
}

/// Flattening after the batch axis.
fn flatten(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let x = cx.val(0)?;
    if cx.a.int("axis", 1) != 1 {
        return Err(cx.invalid(format!(
            "axis = {}: only flattening after the batch axis (axis = 1) is supported",
            cx.a.int("axis", 1)
        )));
    }
    Ok(Sym::Val(cx.push(g, FOp::Flatten(Flatten {}), vec![x])))
}

/// A Reshape that flattens to (batch, n).
fn reshape(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let x = cx.val(0)?;
    let shape = cx
        .konst(1)?
        .ok_or_else(|| cx.invalid("target shape is missing".into()))?;
    let n = cx.shapes[x].len() as i64;
    Ok(match shape.i[..] {
        [_, d] if d == -1 || d == n => Sym::Val(cx.push(g, FOp::Flatten(Flatten {}), vec![x])),
        _ => {
            return Err(cx.invalid(format!(
                "target shape {:?}: only flattening to (batch, {n}) is supported",
                shape.i
            )))
        }
    })
}

/// Two computed tensors of one shape, or a constant folded as a bias.
fn add(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    Ok(match (cx.sym(0)?.clone(), cx.sym(1)?.clone()) {
        (Sym::Nhwc(x), Sym::Nhwc(y)) if cx.shapes[x].len() == cx.shapes[y].len() => {
            Sym::Nhwc(cx.push(g, FOp::Add, vec![x, y]))
        }
        (Sym::Val(x), Sym::Val(y)) => {
            if cx.shapes[x].len() != cx.shapes[y].len() {
                return Err(cx.invalid(format!(
                    "adds tensors of different shapes {:?} and {:?} (broadcasting is not supported)",
                    cx.shapes[x].chw, cx.shapes[y].chw
                )));
            }
            Sym::Val(cx.push(g, FOp::Add, vec![x, y]))
        }
        (Sym::Val(x), Sym::Const(c)) | (Sym::Const(c), Sym::Val(x)) => {
            // a bias after MatMul (or a Conv/Gemm nothing else reads): fold it
            let name = if matches!(cx.sym(0)?, Sym::Val(_)) {
                &cx.node.input[0]
            } else {
                &cx.node.input[1]
            };
            let sole = cx.uses.get(name.as_str()) == Some(&1);
            let chans = cx.shapes[x].channels();
            let fits = sole && (c.f.len() == chans || c.f.len() == 1);
            let Some(l) = x
                .checked_sub(1)
                .filter(|_| fits)
                .and_then(|n| g.nodes[n].op.linear_mut())
            else {
                return Err(cx.invalid(
                    "adding a constant is only supported as the bias of the MatMul, Gemm or Conv right before it".into(),
                ));
            };
            for (ch, b) in l.bias.iter_mut().enumerate() {
                *b += c.f[if c.f.len() == 1 { 0 } else { ch }];
            }
            Sym::Val(x)
        }
        _ => return Err(cx.invalid("adds two constants".into())),
    })
}

/// Constants become integers; a computed value becomes a pending quantizer.
fn quantize_linear(cx: &NodeCx) -> Result<Sym, ImportError> {
    let (scales, zeros, ty, axis) = cx.qparams()?;
    let (lo, hi) = int_range(ty).unwrap_or((0, 255));
    Ok(match cx.sym(0)? {
        Sym::Const(c) => {
            let i: Vec<i64> =
                c.f.iter()
                    .enumerate()
                    .map(|(k, &x)| {
                        let j = along(&c.dims, axis, k, scales.len());
                        QSpec {
                            scale: scales[j],
                            zero: zeros[j] as i32,
                            qmin: lo as i32,
                            qmax: hi as i32,
                        }
                        .level(x) as i64
                    })
                    .collect();
            Sym::Const(Const {
                dims: c.dims.clone(),
                f: i.iter().map(|&v| v as f32).collect(),
                i,
                ty,
                deq: None,
            })
        }
        Sym::Val(v) => {
            if scales.len() != 1 {
                return Err(cx.invalid(
                        "a per-channel quantizer on computed values is not supported (fhecam reads per-channel scales on weights; activations need one scale)".into(),
                    ));
            }
            Sym::Quant(
                *v,
                QSpec {
                    scale: scales[0],
                    zero: zeros[0] as i32,
                    qmin: lo as i32,
                    qmax: hi as i32,
                },
            )
        }
        _ => return Err(cx.invalid("quantizes a value in NHWC layout".into())),
    })
}

/// Narrows a pending quantizer or an integer constant (QCDQ).
fn clip(cx: &NodeCx) -> Result<Sym, ImportError> {
    let bound = |k: usize, attr: &str| -> Result<Option<f32>, ImportError> {
        Ok(match cx.konst(k)? {
            Some(c) if c.f.len() == 1 => Some(c.f[0]),
            Some(c) => {
                return Err(cx.invalid(format!("bound {k} has {} values, need one", c.f.len())))
            }
            None => cx.a.get(attr).map(|x| x.f),
        })
    };
    let (lo, hi) = (bound(1, "min")?, bound(2, "max")?);
    Ok(match cx.sym(0)?.clone() {
            Sym::Quant(v, mut q) => {
                if let Some(lo) = lo {
                    q.qmin = q.qmin.max(lo.ceil().clamp(-1e9, 1e9) as i32);
                }
                if let Some(hi) = hi {
                    q.qmax = q.qmax.min(hi.floor().clamp(-1e9, 1e9) as i32);
                }
                if q.qmin >= q.qmax {
                    return Err(cx.invalid(format!(
                        "clips the quantized value to {}..={}: no range left",
                        q.qmin, q.qmax
                    )));
                }
                Sym::Quant(v, q)
            }
            Sym::Const(mut c) if int_range(c.ty).is_some() => {
                for (i, f) in c.i.iter_mut().zip(&mut c.f) {
                    let mut x = *i as f32;
                    if let Some(lo) = lo {
                        x = x.max(lo);
                    }
                    if let Some(hi) = hi {
                        x = x.min(hi);
                    }
                    *i = x as i64;
                    *f = x;
                }
                Sym::Const(c)
            }
            _ => {
                return Err(cx.invalid(
                    "Clip on float values (e.g. ReLU6) is not supported; fhecam reads Clip only between QuantizeLinear and DequantizeLinear".into(),
                ))
            }
        })
}

/// Closes a quantizer (a node of its own) or dequantizes an integer constant.
fn dequantize_linear(cx: &NodeCx, g: &mut FGraph) -> Result<Sym, ImportError> {
    let (scales, zeros, _, axis) = cx.qparams()?;
    Ok(match cx.sym(0)?.clone() {
            Sym::Const(c) if int_range(c.ty).is_some() || DataType::from_i32(c.ty) == Some(DataType::Int32) => {
                let f: Vec<f32> = c
                    .i
                    .iter()
                    .enumerate()
                    .map(|(k, &q)| {
                        let j = along(&c.dims, axis, k, scales.len());
                        (q - zeros[j]) as f32 * scales[j]
                    })
                    .collect();
                let deq = (0..f.len())
                    .map(|k| scales[along(&c.dims, axis, k, scales.len())])
                    .collect();
                Sym::Const(Const {
                    dims: c.dims,
                    f,
                    i: vec![],
                    ty: DataType::Float as i32,
                    deq: Some(deq),
                })
            }
            Sym::Quant(v, q) => {
                if scales.len() != 1 || scales[0] != q.scale || zeros[0] != q.zero as i64 {
                    return Err(cx.invalid(format!(
                        "scale {:?} and zero point {:?} differ from its QuantizeLinear's ({} and {}); fhecam reads a quantizer whose two halves agree",
                        scales, zeros, q.scale, q.zero
                    )));
                }
                if q.levels() > 256 {
                    return Err(cx.invalid(format!(
                        "a quantizer of {} levels ({}..={}): fhecam reads quantizers of at most 8 bits",
                        q.levels(),
                        q.qmin,
                        q.qmax
                    )));
                }
                Sym::Val(cx.push(g, FOp::Quant(q), vec![v]))
            }
            _ => {
                return Err(cx.invalid(
                    "dequantizes a value that is neither a quantized constant nor the output of a QuantizeLinear".into(),
                ))
            }
        })
}
