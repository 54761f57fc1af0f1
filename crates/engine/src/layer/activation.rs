//! Accumulator -> activation through a lookup table in which requantization is folded.

use serde::{Deserialize, Serialize};

use super::Layer;
use crate::fhe::backend::Backend;
use crate::fhe::circuit::CircuitError;
use crate::fhe::eval::{act_digits, to_accs, Circuit, Cx, EvalError, Tensor};
use crate::model::{Kind, ValueInfo, MAX_ACT_BITS};
use rayon::prelude::*;

/// One table for the whole tensor, or one per channel (folded BatchNorm and per-channel
/// weight scales need that); the channel of element i is i / (H*W).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub bits: u8,
    pub tables: Vec<ActTable>,
}

/// `values[clamp(v - min, 0, len - 1)]`: inputs below/above the table clamp to its ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActTable {
    pub min: i64,
    pub values: Vec<u8>,
}

impl ActTable {
    pub fn lookup(&self, v: i64) -> u8 {
        self.values[(v - self.min).clamp(0, self.values.len() as i64 - 1) as usize]
    }
    /// The first input of every level change (where the value differs from the one below).
    pub fn thresholds(&self) -> Vec<i64> {
        (1..self.values.len())
            .filter(|&i| self.values[i] != self.values[i - 1])
            .map(|i| self.min + i as i64)
            .collect()
    }
    /// Builds a table covering `lo..=hi` from a function.
    pub fn from_fn(lo: i64, hi: i64, f: impl Fn(i64) -> u8) -> Self {
        ActTable {
            min: lo,
            values: (lo..=hi).map(f).collect(),
        }
    }
}

impl Activation {
    /// The table of element `i` of a value of type `a`.
    pub fn table_of(&self, a: &ValueInfo, i: usize) -> &ActTable {
        &self.tables[if self.tables.len() == 1 {
            0
        } else {
            a.channel_of(i)
        }]
    }
}

impl Layer for Activation {
    fn name(&self) -> &'static str {
        "activation"
    }

    /// The tables (one, or one per channel) give the largest level.
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo, String> {
        let (a, bits) = (inputs[0], self.bits);
        if !(1..=MAX_ACT_BITS).contains(&bits) {
            return Err(format!("bits must be 1..={MAX_ACT_BITS}, got {bits}"));
        }
        if self.tables.len() != 1 && self.tables.len() != a.shape[0] {
            return Err(format!(
                "needs 1 table or one per channel ({}), got {}",
                a.shape[0],
                self.tables.len()
            ));
        }
        let top = (1u8 << bits) - 1;
        for t in &self.tables {
            if t.values.is_empty() || t.values.len() > 1 << 20 {
                return Err(format!("table length {} must be 1..=2^20", t.values.len()));
            }
            if let Some(v) = t.values.iter().find(|&&v| v > top) {
                return Err(format!("table value {v} exceeds {bits} bits"));
            }
            if t.min.abs() > 1 << 40 {
                return Err(format!("table start {} is out of range", t.min));
            }
        }
        let max = self.tables.iter().flat_map(|t| t.values.iter().copied());
        Ok(ValueInfo {
            kind: Kind::Act {
                max: max.max().unwrap_or(0),
            },
            ..a.clone()
        })
    }

    fn reference(&self, inputs: &[&[i64]], infos: &[&ValueInfo]) -> Vec<i64> {
        let a = inputs[0];
        let lookup = |(i, &v)| self.table_of(infos[0], i).lookup(v) as i64;
        a.iter().enumerate().map(lookup).collect()
    }
}

impl Circuit for Activation {
    fn circuit<B: Backend>(&self, cx: &Cx<'_, B>) -> Result<Tensor<B::Ct>, EvalError> {
        let (accs, ai) = (to_accs(cx.inputs[0]), cx.infos[0]);
        let Kind::Act { max } = cx.out.kind else {
            return Err(EvalError::Input("output is not an activation".into()));
        };
        let out_digits = act_digits(max);
        let ys: Result<Vec<_>, CircuitError> = accs
            .into_par_iter()
            .enumerate()
            .map(|(i, acc)| {
                let tab = self.table_of(ai, i);
                let domain = (tab.min, tab.min + tab.values.len() as i64 - 1);
                cx.e.apply_table_digits(acc, &|s| tab.lookup(s) as i64, out_digits, Some(domain))
            })
            .collect();
        Ok(Tensor::Act(ys?))
    }
}
