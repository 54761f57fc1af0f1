//! One module per layer kind. A kind is a type that owns its parameters, its shape
//! inference, its MAC count and its plaintext reference ([`Layer`], here) and its circuit
//! ([`crate::fhe::eval::Circuit`], in the same module). `model::Op` has one arm per kind,
//! and every `match` on it is exhaustive, so the compiler names each place a new kind
//! must fill (docs/DESIGN.md, "Adding a layer").

mod activation;
mod add;
mod conv2d;
mod dense;
mod flatten;
pub mod lut;
mod pool;

pub use activation::{ActTable, Activation};
pub use add::Add;
pub use conv2d::{conv_shape, Conv2d};
pub use dense::Dense;
pub use flatten::Flatten;
pub use lut::{GroupSum, Lut, LutNeuron};
pub use pool::{MaxPool, SumPool};

use crate::model::ValueInfo;

/// What the engine asks of every layer kind, independent of any ciphertext.
pub trait Layer {
    /// The `type` tag of the kind in the model's JSON.
    fn name(&self) -> &'static str;
    /// How many values the layer reads.
    fn arity(&self) -> usize {
        1
    }
    /// The output's static type from the inputs', or why the layer does not fit them.
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String>;
    /// Ciphertext × ciphertext multiply-accumulates (inputs already checked by `infer`).
    fn macs(&self, _inputs: &[&ValueInfo]) -> u64 {
        0
    }
    /// The plaintext integer reference: the specification the circuit matches bit for bit.
    fn reference(&self, inputs: &[&[i64]], infos: &[&ValueInfo]) -> Vec<i64>;
    /// Encrypted weights and biases, for the layers that have them.
    fn linear(&self) -> Option<Linear<'_>> {
        None
    }
    /// [`Layer::linear`], to change the weights in place (the owner's what-if plans).
    fn linear_mut(&mut self) -> Option<LinearMut<'_>> {
        None
    }
    /// Replaces every secret parameter by a public placeholder (the architecture a bundle
    /// carries in the clear; the encrypted parameters travel beside it).
    fn strip(&mut self) {}
    /// What the layer does with a frame the camera holds in the clear (device-clear mode).
    fn clear_frame(&self) -> ClearFrame {
        ClearFrame::Refuses
    }
}

/// How a layer treats a clear frame in device-clear mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearFrame {
    /// The frame must be encrypted first.
    Refuses,
    /// The layer reads it with clear tables of encrypted entries (no PBS).
    Consumes,
    /// The layer passes it on unchanged, still clear.
    PassesThrough,
    /// The layer computes on it in the clear (published tables); its output stays clear.
    Computes,
}

/// The parameters a Conv2d or Dense layer has (what gets encrypted) and their public bounds.
pub struct Linear<'a> {
    pub weights: &'a [i8],
    pub bias: &'a [i32],
    pub weight_range: [i8; 2],
    pub bias_range: [i32; 2],
}

/// [`Linear`], mutable.
pub struct LinearMut<'a> {
    pub weights: &'a mut [i8],
    pub bias: &'a mut [i32],
    pub weight_range: &'a mut [i8; 2],
    pub bias_range: &'a mut [i32; 2],
}

/// The `Layer` methods of the kinds whose parameters are encrypted weights and biases
/// (`weights`, `bias`, `weight_range`, `bias_range`): Conv2d and Dense answer alike.
macro_rules! linear_params {
    () => {
        fn linear(&self) -> Option<$crate::layer::Linear<'_>> {
            Some($crate::layer::Linear {
                weights: &self.weights,
                bias: &self.bias,
                weight_range: self.weight_range,
                bias_range: self.bias_range,
            })
        }

        fn linear_mut(&mut self) -> Option<$crate::layer::LinearMut<'_>> {
            Some($crate::layer::LinearMut {
                weights: &mut self.weights,
                bias: &mut self.bias,
                weight_range: &mut self.weight_range,
                bias_range: &mut self.bias_range,
            })
        }

        /// Weights and biases become their range's lower bound.
        fn strip(&mut self) {
            self.weights.fill(self.weight_range[0]);
            self.bias.fill(self.bias_range[0]);
        }

        /// A clear frame is read through clear tables of encrypted products.
        fn clear_frame(&self) -> $crate::layer::ClearFrame {
            $crate::layer::ClearFrame::Consumes
        }
    };
}
pub(crate) use linear_params;

/// The input of a layer that reads one activation, or why it is not one.
pub(crate) fn act_max(a: &ValueInfo) -> Result<u8, String> {
    match a.kind {
        crate::model::Kind::Act { max } => Ok(max),
        crate::model::Kind::Acc { .. } => {
            Err("input must be an activation (add an Activation node before it)".into())
        }
    }
}

/// Range of `Σ w·x + b` over `n` terms with `x ∈ 0..=x_max`.
pub(crate) fn dot_range(n: usize, x_max: i64, w: [i8; 2], b: [i32; 2]) -> (i64, i64) {
    let (wl, wh) = (w[0] as i64, w[1] as i64);
    let lo = (wl * x_max).min(0) * n as i64 + b[0] as i64;
    let hi = (wh * x_max).max(0) * n as i64 + b[1] as i64;
    (lo, hi)
}

/// Checks a linear layer's parameter counts and public bounds.
pub(crate) fn check_params(l: &Linear<'_>, n_w: usize, n_b: usize) -> Result<(), String> {
    let (wr, br) = (l.weight_range, l.bias_range);
    if l.weights.len() != n_w || l.bias.len() != n_b {
        return Err(format!(
            "expected {n_w} weights and {n_b} biases, got {} and {}",
            l.weights.len(),
            l.bias.len()
        ));
    }
    if wr[0] > wr[1] || (wr[1] as i16 - wr[0] as i16) > crate::model::MAX_WEIGHT_SPAN {
        return Err(format!(
            "weight_range {wr:?} must be ordered and span at most {} values (8-bit weights)",
            crate::model::MAX_WEIGHT_SPAN + 1
        ));
    }
    if br[0] > br[1] || (br[1] as i64 - br[0] as i64) > 1 << 20 {
        return Err(format!("bias_range {br:?} is empty or wider than 2^20"));
    }
    if let Some(w) = l.weights.iter().find(|&&w| w < wr[0] || w > wr[1]) {
        return Err(format!("weight {w} lies outside weight_range {wr:?}"));
    }
    if let Some(b) = l.bias.iter().find(|&&b| b < br[0] || b > br[1]) {
        return Err(format!("bias {b} lies outside bias_range {br:?}"));
    }
    Ok(())
}

/// The `type` tag of every layer kind, in `Op`'s order (docs/DESIGN.md lists them).
pub const KINDS: &[&str] = &[
    "conv2d",
    "dense",
    "sum_pool",
    "max_pool",
    "activation",
    "add",
    "flatten",
    "lut",
    "group_sum",
];

#[cfg(test)]
mod tests {
    use super::KINDS;
    use crate::model::Op;

    /// Every kind round-trips through its JSON tag, and docs/DESIGN.md's list is this one.
    #[test]
    fn kinds_documented() {
        for kind in KINDS {
            let err = serde_json::from_str::<Op>(&format!(r#"{{"type":"{kind}"}}"#))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                !err.contains("unknown variant"),
                "{kind} is not an Op: {err}"
            );
        }
        // exhaustive: a new `Op` arm does not compile until it has its place in KINDS
        let place = |op: &Op| match op {
            Op::Conv2d(_) => 0,
            Op::Dense(_) => 1,
            Op::SumPool(_) => 2,
            Op::MaxPool(_) => 3,
            Op::Activation(_) => 4,
            Op::Add(_) => 5,
            Op::Flatten(_) => 6,
            Op::Lut(_) => 7,
            Op::GroupSum(_) => 8,
        };
        let m =
            crate::testnet::random_model(&mut rand::thread_rng(), crate::testnet::Shape::small());
        for node in &m.nodes {
            assert_eq!(KINDS[place(&node.op)], node.op.name());
        }
        let design = include_str!("../../../../docs/DESIGN.md");
        let listed = design
            .split("The\nlayer kinds today: ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .expect("docs/DESIGN.md has its 'Adding a layer' list");
        let listed: Vec<&str> = listed.split(',').map(|s| s.trim()).collect();
        assert_eq!(
            listed, KINDS,
            "docs/DESIGN.md 'Adding a layer' and layer::KINDS differ"
        );
    }
}
