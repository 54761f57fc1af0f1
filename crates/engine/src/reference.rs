//! Plaintext integer reference: the specification the encrypted evaluation must match bit for bit.

use crate::model::{Model, ModelError, Op, ValueInfo};

/// Evaluates the model on an integer input; returns every value (index 0 = input).
pub fn evaluate_all(model: &Model, input: &[u8]) -> Result<Vec<Vec<i64>>, ModelError> {
    let infos = model.infer()?;
    if input.len() != model.input.len() {
        return Err(ModelError::Input(format!(
            "expected {} input values ({}x{}x{}), got {}",
            model.input.len(),
            model.input.channels,
            model.input.height,
            model.input.width,
            input.len()
        )));
    }
    let top = ((1u16 << model.input.bits) - 1) as u8;
    if let Some(v) = input.iter().find(|&&v| v > top) {
        return Err(ModelError::Input(format!(
            "input value {v} exceeds {} bits",
            model.input.bits
        )));
    }
    let mut vals: Vec<Vec<i64>> = vec![input.iter().map(|&v| v as i64).collect()];
    for node in &model.nodes {
        let a = &vals[node.inputs[0]];
        let ai = &infos[node.inputs[0]];
        let out = match &node.op {
            Op::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                weights,
                bias,
                ..
            } => conv(
                a,
                ai,
                *out_channels,
                *kernel,
                *stride,
                *padding,
                weights,
                bias,
            ),
            Op::Dense {
                out_features,
                weights,
                bias,
                ..
            } => {
                let n = a.len();
                (0..*out_features)
                    .map(|o| {
                        let row = &weights[o * n..(o + 1) * n];
                        row.iter().zip(a).map(|(&w, &x)| w as i64 * x).sum::<i64>() + bias[o] as i64
                    })
                    .collect()
            }
            Op::SumPool { kernel, stride } => pool(a, ai, *kernel, *stride, |w| w.iter().sum()),
            Op::MaxPool { kernel, stride } => {
                pool(a, ai, *kernel, *stride, |w| *w.iter().max().unwrap())
            }
            Op::Activation { tables, .. } => a
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let t = &tables[if tables.len() == 1 {
                        0
                    } else {
                        ai.channel_of(i)
                    }];
                    t.lookup(v) as i64
                })
                .collect(),
            Op::Add { mul } => {
                let b = &vals[node.inputs[1]];
                let bi = &infos[node.inputs[1]];
                a.iter()
                    .zip(b)
                    .enumerate()
                    .map(|(i, (x, y))| x + add_mul(mul, bi, i) * y)
                    .collect()
            }
            Op::Flatten => a.clone(),
            Op::Lut(l) => l.eval(a),
            Op::GroupSum(g) => g.eval(a),
        };
        vals.push(out);
    }
    Ok(vals)
}

/// The logits (the last node's values).
pub fn evaluate(model: &Model, input: &[u8]) -> Result<Vec<i64>, ModelError> {
    Ok(evaluate_all(model, input)?.pop().unwrap())
}

/// Index of the largest logit; ties go to the lowest index (the owner's agent decides the same way).
pub fn argmax(logits: &[i64]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Convolution over an explicitly zero-padded copy of the input: the geometry is written
/// independently of the engine's (`fhe::geometry`), which skips padding taps instead, so
/// the property tests compare two implementations.
#[allow(clippy::too_many_arguments)]
fn conv(
    a: &[i64],
    ai: &ValueInfo,
    oc: usize,
    k: [usize; 2],
    s: [usize; 2],
    p: [usize; 2],
    weights: &[i8],
    bias: &[i32],
) -> Vec<i64> {
    let [c, h, w] = ai.shape;
    let (hp, wp) = (h + 2 * p[0], w + 2 * p[1]);
    let mut padded = vec![0i64; c * hp * wp];
    for ic in 0..c {
        for y in 0..h {
            let row = (ic * hp + y + p[0]) * wp + p[1];
            padded[row..row + w].copy_from_slice(&a[(ic * h + y) * w..(ic * h + y + 1) * w]);
        }
    }
    let oh = (hp - k[0]) / s[0] + 1;
    let ow = (wp - k[1]) / s[1] + 1;
    let mut out = vec![0i64; oc * oh * ow];
    for (n, v) in out.iter_mut().enumerate() {
        let (o, oy, ox) = (n / (oh * ow), (n / ow) % oh, n % ow);
        let mut acc = bias[o] as i64;
        for (t, &wt) in weights[o * c * k[0] * k[1]..(o + 1) * c * k[0] * k[1]]
            .iter()
            .enumerate()
        {
            let (ic, ky, kx) = (t / (k[0] * k[1]), (t / k[1]) % k[0], t % k[1]);
            acc += wt as i64 * padded[(ic * hp + oy * s[0] + ky) * wp + ox * s[1] + kx];
        }
        *v = acc;
    }
    out
}

fn pool(
    a: &[i64],
    ai: &ValueInfo,
    k: [usize; 2],
    s: [usize; 2],
    f: impl Fn(&[i64]) -> i64,
) -> Vec<i64> {
    let [c, h, w] = ai.shape;
    let (oh, ow) = ((h - k[0]) / s[0] + 1, (w - k[1]) / s[1] + 1);
    let mut win = Vec::with_capacity(k[0] * k[1]);
    (0..c * oh * ow)
        .map(|n| {
            let (ch, oy, ox) = (n / (oh * ow), (n / ow) % oh, n % ow);
            win.clear();
            for y in oy * s[0]..oy * s[0] + k[0] {
                let row = (ch * h + y) * w;
                win.extend_from_slice(&a[row + ox * s[1]..row + ox * s[1] + k[1]]);
            }
            f(&win)
        })
        .collect()
}

/// The multiplier `Op::Add` applies to element `i` of its second input.
pub fn add_mul(mul: &[u32], b: &ValueInfo, i: usize) -> i64 {
    match mul.len() {
        0 => 1,
        1 => mul[0] as i64,
        _ => mul[b.channel_of(i)] as i64,
    }
}
