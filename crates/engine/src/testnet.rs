//! Random networks using every layer kind, for property tests and `fhecam selftest`.

use crate::model::{
    ActTable, Activation, Add, Conv2d, Dense, Flatten, GroupSum, Kind, Lut, LutNeuron, MaxPool,
    Model, Node, Op, SumPool, MODEL_FORMAT_VERSION,
};
use rand::Rng;

/// Size knobs: `tiny` keeps the PBS count low enough for real TFHE in CI.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hw: usize,
    pub channels: usize,
    pub classes: usize,
    /// Activations up to 4 bits and weights spanning up to 41 levels (several base-4
    /// digits per value), as imported models use.
    pub wide: bool,
}

impl Shape {
    pub fn tiny() -> Self {
        Shape {
            hw: 3,
            channels: 1,
            classes: 2,
            wide: false,
        }
    }
    pub fn small() -> Self {
        Shape {
            hw: 5,
            channels: 2,
            classes: 3,
            wide: true,
        }
    }
    /// `tiny` with multi-digit activations and weights.
    pub fn tiny_wide() -> Self {
        Shape {
            wide: true,
            ..Self::tiny()
        }
    }
}

fn weight_range(rng: &mut impl Rng, wide: bool) -> [i8; 2] {
    if wide && rng.gen_bool(0.6) {
        [-rng.gen_range(0..=20), rng.gen_range(0..=20)]
    } else {
        [[-1, 1], [-2, 1], [-1, 2], [0, 1], [-1, 0], [0, 3]][rng.gen_range(0..6)]
    }
}

fn bits(rng: &mut (impl Rng + ?Sized), wide: bool) -> u8 {
    rng.gen_range(1..=if wide { 4 } else { 2 })
}

fn bias_range(rng: &mut impl Rng) -> [i32; 2] {
    let lo = rng.gen_range(-20..=3);
    [lo, lo + rng.gen_range(0..=24)]
}

fn linear_params(
    rng: &mut impl Rng,
    nw: usize,
    nb: usize,
    wide: bool,
) -> (Vec<i8>, Vec<i32>, [i8; 2], [i32; 2]) {
    let wr = weight_range(rng, wide);
    let br = bias_range(rng);
    let w = (0..nw).map(|_| rng.gen_range(wr[0]..=wr[1])).collect();
    let b = (0..nb).map(|_| rng.gen_range(br[0]..=br[1])).collect();
    (w, b, wr, br)
}

/// A random activation table over `lo..=hi`: a quantizer on a power-of-two step, a
/// requantizing ReLU (monotone, ≤ 3 steps), or
/// an arbitrary table with a handful of level changes; sometimes narrower than the range,
/// so that clamping at the ends is exercised too.
fn table(rng: &mut (impl Rng + ?Sized), lo: i64, hi: i64, bits: u8) -> ActTable {
    let top = (1i64 << bits) - 1;
    let (tlo, thi) = if rng.gen_bool(0.3) && hi > lo + 2 {
        (
            rng.gen_range(lo..=lo + (hi - lo) / 3),
            rng.gen_range(hi - (hi - lo) / 3..=hi),
        )
    } else {
        (lo, hi)
    };
    if rng.gen_bool(0.2) {
        // a quantizer on a power-of-two step, as `import` builds them
        let step = 1i64 << rng.gen_range(0..=5);
        let c = rng.gen_range(lo..=hi);
        ActTable::from_fn(tlo, thi, |s| {
            ((s - c).div_euclid(step) + 1).clamp(0, top) as u8
        })
    } else if rng.gen_bool(0.6) {
        let scale = rng.gen_range(0.05..1.5);
        let shift = rng.gen_range(-3.0..3.0);
        ActTable::from_fn(tlo, thi, |s| {
            ((s as f64 * scale + shift).round().clamp(0.0, top as f64)) as u8
        })
    } else {
        let changes = rng.gen_range(1..=6);
        let mut cuts: Vec<i64> = (0..changes).map(|_| rng.gen_range(tlo..=thi)).collect();
        cuts.sort();
        let levels: Vec<u8> = (0..=changes)
            .map(|_| rng.gen_range(0..=top as u8))
            .collect();
        ActTable::from_fn(tlo, thi, |s| {
            levels[cuts.iter().filter(|&&c| s >= c).count()]
        })
    }
}

/// A model with a random frame of `channels` × `hw` × `hw` pixels of `bits`, and no layer.
fn empty_model(name: &str, channels: usize, shape: Shape, bits: u8) -> Model {
    Model {
        format_version: MODEL_FORMAT_VERSION,
        name: name.into(),
        input: crate::model::InputSpec {
            channels,
            height: shape.hw,
            width: shape.hw,
            bits,
            scale: 1.0 / ((1 << bits) - 1) as f32,
            zero: 0.0,
        },
        nodes: vec![],
        num_classes: shape.classes,
    }
}

/// A convolution with random parameters.
fn random_conv(rng: &mut impl Rng, geometry: [usize; 5], wide: bool) -> Op {
    let [ic, oc, k, s, p] = geometry;
    let (weights, bias, weight_range, bias_range) = linear_params(rng, oc * ic * k * k, oc, wide);
    Op::Conv2d(Conv2d {
        out_channels: oc,
        kernel: [k, k],
        stride: [s, s],
        padding: [p, p],
        weights,
        bias,
        weight_range,
        bias_range,
    })
}

impl Model {
    fn push(&mut self, op: Op, inputs: Vec<usize>) -> usize {
        self.nodes.push(Node { op, inputs });
        self.nodes.len()
    }

    /// A random activation of value `v` (one table, or one per channel).
    fn push_act(&mut self, rng: &mut impl Rng, v: usize, wide: bool) -> usize {
        let infos = self.infer_partial();
        let info = &infos[v];
        let (lo, hi) = info.range();
        let bits = bits(rng, wide);
        let n = if rng.gen_bool(0.5) { 1 } else { info.shape[0] };
        let tables = (0..n).map(|_| table(rng, lo, hi, bits)).collect();
        self.push(Op::Activation(Activation { bits, tables }), vec![v])
    }

    /// Max pooling, sum pooling and an activation, when the map is at least 2 high.
    fn push_pools(&mut self, rng: &mut impl Rng, v: usize, wide: bool) -> usize {
        if self.infer_partial()[v].shape[1] < 2 {
            return v;
        }
        let kernel = [2, 2];
        let v = self.push(
            Op::MaxPool(MaxPool {
                kernel,
                stride: [1, 1],
            }),
            vec![v],
        );
        let w = self.infer_partial()[v].shape[2];
        let kernel = [1, w.min(2)];
        let v = self.push(
            Op::SumPool(SumPool {
                kernel,
                stride: [1, 1],
            }),
            vec![v],
        );
        self.push_act(rng, v, wide)
    }
}

/// A random network: conv → act → conv(same) → add(residual) → act → maxpool → sumpool →
/// act → flatten → dense.
pub fn random_model(rng: &mut impl Rng, shape: Shape) -> Model {
    // camera frames may keep up to 8 bits (device-clear tables read them in 4-bit chunks)
    let in_bits = if shape.wide && rng.gen_bool(0.3) {
        rng.gen_range(5..=8)
    } else {
        bits(rng, shape.wide)
    };
    let (c, wide) = (shape.channels, shape.wide);
    let mut m = empty_model("random", rng.gen_range(1..=c), shape, in_bits);
    // conv 1: kernel 2 or 3, stride 1 or 2, padding 0 or 1 (keeping at least 2x2 out)
    let k = rng.gen_range(2..=3usize.min(shape.hw));
    let (s, p) = (rng.gen_range(1..=2), rng.gen_range(0..=1));
    let s = if (shape.hw + 2 * p - k) / s + 1 < 2 {
        1
    } else {
        s
    };
    let oc = rng.gen_range(1..=c);
    let ic = m.input.channels;
    let v = m.push(random_conv(rng, [ic, oc, k, s, p], wide), vec![0]);
    let a1 = m.push_act(rng, v, wide);
    // residual block: same-size conv, added to its input
    let v = m.push(random_conv(rng, [oc, oc, 3, 1, 1], wide), vec![a1]);
    let mul = if wide && rng.gen_bool(0.5) {
        vec![rng.gen_range(1..=20)]
    } else {
        vec![]
    };
    let v = m.push(Op::Add(Add { mul }), vec![v, a1]);
    let v = m.push_act(rng, v, wide);
    let v = m.push_pools(rng, v, wide);
    let v = m.push(Op::Flatten(Flatten {}), vec![v]);
    let n_in = m.infer_partial()[v].len();
    let (weights, bias, weight_range, bias_range) =
        linear_params(rng, shape.classes * n_in, shape.classes, wide);
    let dense = Dense {
        out_features: shape.classes,
        weights,
        bias,
        weight_range,
        bias_range,
    };
    m.push(Op::Dense(dense), vec![v]);
    m.infer().expect("random model is valid");
    m
}

/// A random integer input for the model.
pub fn random_input(rng: &mut impl Rng, m: &Model) -> Vec<u8> {
    let top = ((1u16 << m.input.bits) - 1) as u8;
    (0..m.input.len()).map(|_| rng.gen_range(0..=top)).collect()
}

impl Model {
    fn infer_partial(&self) -> Vec<crate::model::ValueInfo> {
        self.infer_values().expect("partial model is valid")
    }
}

/// Kind of a value, for tests that want to assert coverage.
pub fn kinds(m: &Model) -> Vec<Kind> {
    m.infer().unwrap().into_iter().map(|v| v.kind).collect()
}

/// Random table entries: `len` of them in `0..=top`.
fn entries(rng: &mut (impl Rng + ?Sized), len: usize, top: u8) -> Vec<u8> {
    (0..len).map(|_| rng.gen_range(0..=top)).collect()
}

/// Layer 0 of a table network: each neuron reads one pixel's digits (multiplier 1), or two
/// 2-bit pixels (multipliers 1 and 4).
fn frame_lut(rng: &mut impl Rng, shape: Shape, bits: u8) -> Lut {
    let n_in = shape.hw * shape.hw;
    let top0 = if rng.gen_bool(0.5) { 1 } else { 3 };
    let n0 = rng.gen_range(4..=4 * shape.channels.max(2) + 4);
    let neurons = (0..n0)
        .map(|_| {
            let (inputs, mul) = if bits == 2 && rng.gen_bool(0.5) {
                (
                    vec![rng.gen_range(0..n_in) as u32, rng.gen_range(0..n_in) as u32],
                    vec![1, 4],
                )
            } else {
                (vec![rng.gen_range(0..n_in) as u32], vec![1])
            };
            let span = mul
                .iter()
                .map(|&k| k as usize * ((1 << bits) - 1))
                .sum::<usize>()
                + 1;
            let table = entries(rng, span, top0);
            LutNeuron { inputs, mul, table }
        })
        .collect();
    // half of them published (device-clear cameras then evaluate them in the clear)
    Lut {
        out_max: top0,
        neurons,
        public: rng.gen_bool(0.5),
    }
}

/// The inputs of one neuron over a value of `len` elements in `0..=top`, at most one per
/// class of multipliers (1,2,4,8 for bits, 1,4 for 2-bit values; element i is in class
/// i % classes), their multipliers, and the span of the table they index.
fn pick_inputs(rng: &mut (impl Rng + ?Sized), len: usize, top: u8) -> (Vec<u32>, Vec<u16>, usize) {
    let muls: &[u16] = if top == 1 { &[1, 2, 4, 8] } else { &[1, 4] };
    let classes = muls.len().min(len);
    let k = rng.gen_range(1..=classes);
    let mut chosen: Vec<usize> = (0..classes).collect();
    for i in 0..classes {
        chosen.swap(i, rng.gen_range(i..classes));
    }
    chosen.truncate(k);
    chosen.sort();
    let inputs = chosen
        .iter()
        .map(|&c| {
            let slots = (len - c).div_ceil(classes);
            (c + classes * rng.gen_range(0..slots)) as u32
        })
        .collect::<Vec<u32>>();
    let mul: Vec<u16> = chosen.iter().map(|&c| muls[c]).collect();
    let span = mul
        .iter()
        .map(|&k| k as usize * top as usize)
        .sum::<usize>()
        + 1;
    (inputs, mul, span)
}

/// A random secret-table network: a `lut` layer reading the frame (one pixel, or two
/// 2-bit pixels, per neuron), one or two more `lut` layers, and a `group_sum` over
/// groups of the last one. Every element is read with the one multiplier of its class
/// (`layer::lut::places`).
pub fn random_table_model(rng: &mut impl Rng, shape: Shape) -> Model {
    let bits = if rng.gen_bool(0.5) { 4 } else { 2 };
    let mut m = empty_model("random-tables", 1, shape, bits);
    let lut = frame_lut(rng, shape, bits);
    let mut top = lut.out_max;
    m.push(Op::Lut(lut), vec![0]);
    let layers = rng.gen_range(1..=2);
    for l in 0..=layers {
        let len = m.infer_partial().last().unwrap().len();
        let v = m.nodes.len();
        if l == layers {
            let (classes, score_max) = (shape.classes, rng.gen_range(1..=3));
            let groups = (0..rng.gen_range(1..=4 + shape.channels))
                .map(|_| {
                    let (inputs, mul, span) = pick_inputs(rng, len, top);
                    let table = entries(rng, span * classes, score_max);
                    LutNeuron { inputs, mul, table }
                })
                .collect();
            let op = Op::GroupSum(GroupSum {
                classes,
                score_max,
                groups,
            });
            m.push(op, vec![v]);
        } else {
            let out = if rng.gen_bool(0.5) { 1 } else { 3 };
            let neurons = (0..rng.gen_range(2..=8 + 2 * shape.channels))
                .map(|_| {
                    let (inputs, mul, span) = pick_inputs(rng, len, top);
                    let table = entries(rng, span, out);
                    LutNeuron { inputs, mul, table }
                })
                .collect();
            let op = Op::Lut(Lut {
                out_max: out,
                neurons,
                public: false,
            });
            m.push(op, vec![v]);
            top = out;
        }
    }
    m.infer().expect("random table model is valid");
    m
}

/// Panics unless `got` is the integer reference's logits of `m` on `x`; the message names
/// the case (`what`) and carries the network, so a failure can be replayed.
pub fn assert_reference(m: &Model, x: &[u8], got: &[i64], what: &str) {
    let want = crate::reference::evaluate(m, x).expect("the reference runs every valid model");
    if got != want.as_slice() {
        let json = serde_json::to_string(m).unwrap_or_default();
        panic!("{what}: encrypted logits {got:?} differ from the reference {want:?}; model {json}");
    }
}
