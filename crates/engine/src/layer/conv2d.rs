//! 2-D convolution with encrypted weights and biases.

use serde::{Deserialize, Serialize};

use super::{act_max, check_params, dot_range, linear_params, Layer};
use crate::fhe::backend::Backend;
use crate::fhe::eval::{linear, Circuit, Cx, EvalError, Tensor};
use crate::fhe::geometry::for_each_tap;
use crate::model::{out_dim, Kind, ValueInfo};
use rayon::prelude::*;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Conv2d {
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    /// Layout [out][in][kh][kw]; every value within `weight_range`.
    pub weights: Vec<i8>,
    pub bias: Vec<i32>,
    /// Public bound on weights: the engine plans ranges from it, never from the values.
    pub weight_range: [i8; 2],
    /// Public bound on biases.
    pub bias_range: [i32; 2],
}

impl Layer for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let a = inputs[0];
        let max = act_max(a)?;
        let shape = conv_shape(a, self.out_channels, self.kernel, self.stride, self.padding)?;
        let fan_in = a.shape[0] * self.kernel[0] * self.kernel[1];
        let l = self.linear().expect("conv2d is linear");
        check_params(&l, self.out_channels * fan_in, self.out_channels)?;
        let (lo, hi) = dot_range(fan_in, max as i64, self.weight_range, self.bias_range);
        Ok(ValueInfo {
            shape,
            flat: false,
            kind: Kind::Acc { lo, hi },
        })
    }

    /// Padding taps multiply nothing and are not counted.
    fn macs(&self, inputs: &[&ValueInfo]) -> u64 {
        let [c, h, w] = inputs[0].shape;
        let taps = |len: usize, k: usize, s: usize, p: usize| -> u64 {
            let o = out_dim(len, k, s, p).unwrap_or(0);
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
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        taps(h, k[0], s[0], p[0]) * taps(w, k[1], s[1], p[1]) * (self.out_channels * c) as u64
    }

    /// Convolution over an explicitly zero-padded copy of the input: the geometry is
    /// written independently of the circuit's (`fhe::geometry`), which skips padding taps
    /// instead, so the property tests compare two implementations.
    fn reference(&self, inputs: &[&[i64]], infos: &[&ValueInfo]) -> Vec<i64> {
        let (a, (k, s, p)) = (inputs[0], (self.kernel, self.stride, self.padding));
        let [c, h, w] = infos[0].shape;
        let (hp, wp) = (h + 2 * p[0], w + 2 * p[1]);
        let mut padded = vec![0i64; c * hp * wp];
        for ic in 0..c {
            for y in 0..h {
                let row = (ic * hp + y + p[0]) * wp + p[1];
                padded[row..row + w].copy_from_slice(&a[(ic * h + y) * w..(ic * h + y + 1) * w]);
            }
        }
        let (oh, ow) = ((hp - k[0]) / s[0] + 1, (wp - k[1]) / s[1] + 1);
        let fan_in = c * k[0] * k[1];
        (0..self.out_channels * oh * ow)
            .map(|n| {
                let (o, oy, ox) = (n / (oh * ow), (n / ow) % oh, n % ow);
                let row = &self.weights[o * fan_in..(o + 1) * fan_in];
                let taps = row.iter().enumerate().map(|(t, &wt)| {
                    let (ic, ky, kx) = (t / (k[0] * k[1]), (t / k[1]) % k[0], t % k[1]);
                    wt as i64 * padded[(ic * hp + oy * s[0] + ky) * wp + ox * s[1] + kx]
                });
                self.bias[o] as i64 + taps.sum::<i64>()
            })
            .collect()
    }

    linear_params!();
}

/// The (C,H,W) output of a convolution over `a`, or why its window does not fit: the one
/// geometry both the integer layer and the importer's float layer use.
pub fn conv_shape(
    a: &ValueInfo,
    out_channels: usize,
    k: [usize; 2],
    s: [usize; 2],
    p: [usize; 2],
) -> Result<[usize; 3], String> {
    if a.flat {
        return Err("input is flat; conv2d needs (C,H,W)".into());
    }
    let [_, h, w] = a.shape;
    let (Some(oh), Some(ow)) = (out_dim(h, k[0], s[0], p[0]), out_dim(w, k[1], s[1], p[1])) else {
        return Err(format!(
            "kernel {k:?} stride {s:?} padding {p:?} does not fit input {h}x{w}"
        ));
    };
    Ok([out_channels, oh, ow])
}

impl Circuit for Conv2d {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let (t, ai, p) = cx.linear_input()?;
        let [c, h, w] = ai.shape;
        let (oh, ow) = (cx.out.shape[1], cx.out.shape[2]);
        let (k, s, pad) = (self.kernel, self.stride, self.padding);
        let accs = (0..self.out_channels * oh * ow)
            .into_par_iter()
            .map(|idx| {
                let (oc, oy, ox) = (idx / (oh * ow), (idx / ow) % oh, idx % ow);
                let mut taps = Vec::new();
                for_each_tap(c, h, w, k, s, pad, oy, ox, |ic, ky, kx, i| {
                    taps.push((((oc * c + ic) * k[0] + ky) * k[1] + kx, i));
                });
                linear(
                    cx.e,
                    &taps,
                    t,
                    ai,
                    p,
                    oc,
                    self.weight_range,
                    self.bias_range,
                )
            })
            .collect();
        Ok(Tensor::Acc(accs))
    }
}
