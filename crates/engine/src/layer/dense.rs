//! Fully connected layer with encrypted weights and biases.

use serde::{Deserialize, Serialize};

use super::{act_max, check_params, dot_range, linear_params, Layer};
use crate::fhe::backend::Backend;
use crate::fhe::eval::{linear, Circuit, Cx, EvalError, Tensor};
use crate::model::{Kind, ValueInfo};
use rayon::prelude::*;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dense {
    pub out_features: usize,
    /// Layout [out][in].
    pub weights: Vec<i8>,
    pub bias: Vec<i32>,
    pub weight_range: [i8; 2],
    pub bias_range: [i32; 2],
}

impl Layer for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let a = inputs[0];
        let max = act_max(a)?;
        let n_in = a.len();
        let l = self.linear().expect("dense is linear");
        check_params(&l, self.out_features * n_in, self.out_features)?;
        let (lo, hi) = dot_range(n_in, max as i64, self.weight_range, self.bias_range);
        Ok(ValueInfo {
            shape: [self.out_features, 1, 1],
            flat: true,
            kind: Kind::Acc { lo, hi },
        })
    }

    fn macs(&self, inputs: &[&ValueInfo]) -> u64 {
        (inputs[0].len() * self.out_features) as u64
    }

    fn reference(&self, inputs: &[&[i64]], _infos: &[&ValueInfo]) -> Vec<i64> {
        let a = inputs[0];
        let n = a.len();
        (0..self.out_features)
            .map(|o| {
                let row = &self.weights[o * n..(o + 1) * n];
                row.iter().zip(a).map(|(&w, &x)| w as i64 * x).sum::<i64>() + self.bias[o] as i64
            })
            .collect()
    }

    linear_params!();
}

impl Circuit for Dense {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let (t, ai, p) = cx.linear_input()?;
        let n = ai.len();
        let accs = (0..self.out_features)
            .into_par_iter()
            .map(|o| {
                let taps: Vec<_> = (0..n).map(|i| (o * n + i, i)).collect();
                linear(cx.e, &taps, t, ai, p, o, self.weight_range, self.bias_range)
            })
            .collect();
        Ok(Tensor::Acc(accs))
    }
}
