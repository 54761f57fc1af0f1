//! Pooling over windows: sum pooling (average pooling with the 1/k folded into the next
//! activation table) and exact max pooling of activations.

use serde::{Deserialize, Serialize};

use super::Layer;
use crate::fhe::backend::Backend;
use crate::fhe::circuit::{Acc, Val};
use crate::fhe::eval::{to_accs, Circuit, Cx, EvalError, Tensor};
use crate::fhe::geometry::pool_windows;
use crate::model::{out_dim, Kind, ValueInfo};
use rayon::prelude::*;

/// Sum over windows (average pooling with the 1/k folded into the next activation table).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SumPool {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
}

/// Exact max over windows of activations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MaxPool {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
}

impl Layer for SumPool {
    fn name(&self) -> &'static str {
        "sum_pool"
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let a = inputs[0];
        let shape = window_shape(a, self.kernel, self.stride)?;
        let (k, (lo, hi)) = ((self.kernel[0] * self.kernel[1]) as i64, a.range());
        Ok(ValueInfo {
            shape,
            flat: false,
            kind: Kind::Acc {
                lo: lo * k,
                hi: hi * k,
            },
        })
    }
    fn reference(&self, inputs: &[&[i64]], infos: &[&ValueInfo]) -> Vec<i64> {
        pool(inputs[0], infos[0], self.kernel, self.stride, |w| {
            w.iter().sum()
        })
    }
}

impl Layer for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool"
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let a = inputs[0];
        let shape = window_shape(a, self.kernel, self.stride)?;
        if let Kind::Acc { .. } = a.kind {
            return Err("max pooling needs activations: put it after the Activation node (max commutes with monotone activations)".into());
        }
        Ok(ValueInfo {
            shape,
            flat: false,
            kind: a.kind,
        })
    }
    fn reference(&self, inputs: &[&[i64]], infos: &[&ValueInfo]) -> Vec<i64> {
        pool(inputs[0], infos[0], self.kernel, self.stride, |w| {
            w.iter().copied().max().unwrap_or(0)
        })
    }
}

/// The output shape of a window of `kernel` moved by `stride` over a (C,H,W) value.
fn window_shape(
    a: &ValueInfo,
    kernel: [usize; 2],
    stride: [usize; 2],
) -> Result<[usize; 3], String> {
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
    Ok([c, oh, ow])
}

/// The reference's own window loops (the circuit uses `fhe::geometry`).
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

impl Circuit for SumPool {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let accs = to_accs(cx.inputs[0]);
        let sum = |win: Vec<usize>| {
            win.iter()
                .fold(Acc::zero(), |s, &i| s.merge(accs[i].clone()))
        };
        let windows = pool_windows(cx.infos[0], self.kernel, self.stride);
        Ok(Tensor::Acc(windows.into_iter().map(sum).collect()))
    }
}

impl Circuit for MaxPool {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let (x, e) = (cx.act()?, cx.e);
        let wins = pool_windows(cx.infos[0], self.kernel, self.stride);
        let max = |win: Vec<usize>| {
            // balanced tree: keeps the refresh-free path (variance) likely
            let mut layer: Vec<Vec<Val<B::Ct>>> = win.iter().map(|&i| x[i].clone()).collect();
            while layer.len() > 1 {
                layer = layer
                    .chunks(2)
                    .map(|p| match p {
                        [a, b] if a.len() == 1 => vec![e.max(&a[0], &b[0])],
                        [a, b] => {
                            let bit = e.greater(a, b);
                            e.select(&bit, a, b)
                        }
                        _ => p[0].clone(),
                    })
                    .collect();
            }
            layer.pop().unwrap_or_default()
        };
        Ok(Tensor::Act(wins.into_par_iter().map(max).collect()))
    }
}
