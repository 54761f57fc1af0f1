//! Element-wise `a + m·b` of two tensors of the same shape (residual connection).

use serde::{Deserialize, Serialize};

use super::Layer;
use crate::fhe::backend::Backend;
use crate::fhe::eval::{to_accs, Circuit, Cx, EvalError, Tensor};
use crate::model::{Kind, ValueInfo};

/// `m` is a clear positive integer, one for the tensor or one per channel of `b` (empty:
/// 1), so a branch on a finer scale can be added exactly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Add {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mul: Vec<u32>,
}

impl Add {
    /// The multiplier applied to element `i` of the second input `b`.
    pub fn mul_of(&self, b: &ValueInfo, i: usize) -> i64 {
        match self.mul.len() {
            0 => 1,
            1 => self.mul[0] as i64,
            _ => self.mul[b.channel_of(i)] as i64,
        }
    }
}

impl Layer for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn arity(&self) -> usize {
        2
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let (a, b, mul) = (inputs[0], inputs[1], &self.mul);
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

    fn reference(&self, inputs: &[&[i64]], infos: &[&ValueInfo]) -> Vec<i64> {
        let (a, b) = (inputs[0], inputs[1]);
        let sum = |(i, (x, y)): (usize, (&i64, &i64))| x + self.mul_of(infos[1], i) * y;
        a.iter().zip(b).enumerate().map(sum).collect()
    }
}

impl Circuit for Add {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let (a, b) = (to_accs(cx.inputs[0]), to_accs(cx.inputs[1]));
        let sums = a.into_iter().zip(b).enumerate();
        let sum = sums.map(|(i, (x, y))| x.merge(y.times(self.mul_of(cx.infos[1], i) as u64)));
        Ok(Tensor::Acc(sum.collect()))
    }
}
