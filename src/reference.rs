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
    let oh = (h + 2 * p[0] - k[0]) / s[0] + 1;
    let ow = (w + 2 * p[1] - k[1]) / s[1] + 1;
    let mut out = Vec::with_capacity(oc * oh * ow);
    for o in 0..oc {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = bias[o] as i64;
                for_each_tap(c, h, w, k, s, p, oy, ox, |ic, ky, kx, idx| {
                    acc += weights[((o * c + ic) * k[0] + ky) * k[1] + kx] as i64 * a[idx];
                });
                out.push(acc);
            }
        }
    }
    out
}

/// Calls `f(in_channel, ky, kx, input_index)` for every tap of output (oy, ox) that falls
/// inside the input (padding taps are skipped: they multiply zero).
#[allow(clippy::too_many_arguments)]
pub fn for_each_tap(
    c: usize,
    h: usize,
    w: usize,
    k: [usize; 2],
    s: [usize; 2],
    p: [usize; 2],
    oy: usize,
    ox: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    for ic in 0..c {
        for ky in 0..k[0] {
            let iy = (oy * s[0] + ky) as i64 - p[0] as i64;
            if iy < 0 || iy >= h as i64 {
                continue;
            }
            for kx in 0..k[1] {
                let ix = (ox * s[1] + kx) as i64 - p[1] as i64;
                if ix < 0 || ix >= w as i64 {
                    continue;
                }
                f(ic, ky, kx, (ic * h + iy as usize) * w + ix as usize);
            }
        }
    }
}

/// Input indices of each pooling window, in output order.
pub fn pool_windows(ai: &ValueInfo, k: [usize; 2], s: [usize; 2]) -> Vec<Vec<usize>> {
    let [c, h, w] = ai.shape;
    let oh = (h - k[0]) / s[0] + 1;
    let ow = (w - k[1]) / s[1] + 1;
    let mut out = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut win = Vec::with_capacity(k[0] * k[1]);
                for ky in 0..k[0] {
                    for kx in 0..k[1] {
                        win.push((ch * h + oy * s[0] + ky) * w + ox * s[1] + kx);
                    }
                }
                out.push(win);
            }
        }
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
    pool_windows(ai, k, s)
        .iter()
        .map(|win| f(&win.iter().map(|&i| a[i]).collect::<Vec<_>>()))
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
