//! (C, H, W) -> flat; a no-op on data.

use serde::{Deserialize, Serialize};

use super::{ClearFrame, Layer};
use crate::fhe::backend::Backend;
use crate::fhe::eval::{Circuit, Cx, EvalError, Tensor};
use crate::model::ValueInfo;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Flatten {}

impl Layer for Flatten {
    fn name(&self) -> &'static str {
        "flatten"
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let a = inputs[0];
        Ok(ValueInfo {
            shape: [a.len(), 1, 1],
            flat: true,
            kind: a.kind,
        })
    }

    fn reference(&self, inputs: &[&[i64]], _infos: &[&ValueInfo]) -> Vec<i64> {
        inputs[0].to_vec()
    }

    fn clear_frame(&self) -> ClearFrame {
        ClearFrame::PassesThrough
    }
}

impl Circuit for Flatten {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        Ok(cx.inputs[0].clone())
    }
}
