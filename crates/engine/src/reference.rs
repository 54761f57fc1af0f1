//! Plaintext integer reference: the specification the encrypted evaluation must match bit for bit.

use crate::model::{Model, ModelError, ValueInfo};

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
        let ins: Vec<&[i64]> = node.inputs.iter().map(|&v| vals[v].as_slice()).collect();
        let types: Vec<&ValueInfo> = node.inputs.iter().map(|&v| &infos[v]).collect();
        let out = node.op.layer().reference(&ins, &types);
        vals.push(out);
    }
    Ok(vals)
}

/// The logits (the last node's values).
pub fn evaluate(model: &Model, input: &[u8]) -> Result<Vec<i64>, ModelError> {
    Ok(evaluate_all(model, input)?.pop().unwrap())
}

/// Index of the largest logit; ties go to the lowest index (the owner's agent decides the same
/// way, and so do the importer and trainer on their float logits).
pub fn argmax<T: PartialOrd>(logits: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best
}
