//! Models trained elsewhere: ONNX → float graph → post-training quantization → the engine's
//! integer [`Model`], with the accuracy cost measured.

mod fold;
pub mod graph;
pub mod onnx;
pub mod quantize;

use crate::npy::Array;
use fhecam_engine::model::{Model, ModelError};
use fhecam_engine::reference;
use graph::{FGraph, FShape};
use quantize::QuantConfig;
use std::path::Path;
use thiserror::Error;

/// Largest ONNX file read (small CNNs are kilobytes; this leaves room for real ones).
pub const ONNX_LIMIT: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a readable ONNX model: {0}")]
    Decode(String),
    #[error(
        "operator {op} ({node}) is not supported; fhecam imports: {}",
        onnx::SUPPORTED
    )]
    Unsupported { op: String, node: String },
    #[error("{node}: {msg}")]
    Node { node: String, msg: String },
    #[error("data does not fit the model: {0}")]
    Shape(String),
    #[error("{0}")]
    Config(String),
    #[error("quantization: {0}")]
    Quantize(String),
    #[error("the quantized model is invalid: {0}")]
    Model(#[from] ModelError),
}

/// A parsed ONNX model, ready to quantize or to run in float.
pub struct Parsed {
    pub graph: FGraph,
    pub shapes: Vec<FShape>,
}

/// Reads and parses an ONNX file (size-limited: it is untrusted input).
pub fn read_onnx(path: &Path) -> Result<Parsed, ImportError> {
    let io = |source| ImportError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > ONNX_LIMIT {
        return Err(ImportError::Decode(format!(
            "{}: {len} bytes is over the {ONNX_LIMIT}-byte limit",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse_onnx(&bytes)
}

pub fn parse_onnx(bytes: &[u8]) -> Result<Parsed, ImportError> {
    let graph = onnx::parse(bytes)?;
    let shapes = graph.shapes().map_err(|(n, m)| ImportError::Node {
        node: graph.nodes[n].origin.clone(),
        msg: m,
    })?;
    Ok(Parsed { graph, shapes })
}

impl Parsed {
    /// Checks that data samples have the model's (C, H, W).
    pub fn check_data(&self, data: &Array, what: &str) -> Result<(), ImportError> {
        data.check_samples(self.graph.input, what)
            .map_err(ImportError::Shape)
    }

    /// Float predictions of the parsed graph (our own forward pass; used for calibration).
    pub fn predict_float(&self, data: &Array) -> Vec<usize> {
        (0..data.samples())
            .map(|i| {
                let vals = self.graph.forward(data.sample(i), &self.shapes);
                reference::argmax(&vals[self.graph.output])
            })
            .collect()
    }

    /// Per-channel value ranges over the calibration data.
    pub fn calibrate(&self, calibration: &Array) -> Result<quantize::Ranges, ImportError> {
        self.check_data(calibration, "the calibration data")?;
        Ok(quantize::calibrate(&self.graph, &self.shapes, calibration))
    }

    /// Quantizes with calibration ranges.
    pub fn quantize(
        &self,
        ranges: &quantize::Ranges,
        cfg: QuantConfig,
        name: &str,
    ) -> Result<Model, ImportError> {
        quantize::quantize(&self.graph, &self.shapes, ranges, cfg, name)
    }

    /// [`Parsed::quantize`] with the notes on where the integer model departs from the
    /// ONNX model's own quantizers (QDQ models).
    pub fn quantize_noted(
        &self,
        ranges: &quantize::Ranges,
        cfg: QuantConfig,
        name: &str,
    ) -> Result<(Model, Vec<String>), ImportError> {
        quantize::quantize_noted(&self.graph, &self.shapes, ranges, cfg, name)
    }

    /// [`Parsed::quantize_noted`] with advice: activation quantizers whose level spacing
    /// is near a power of two, and the PBS that power of two would save (planned).
    pub fn quantize_advised(
        &self,
        ranges: &quantize::Ranges,
        cfg: QuantConfig,
        name: &str,
    ) -> Result<(Model, Vec<String>, Vec<String>), ImportError> {
        quantize::quantize_advised(&self.graph, &self.shapes, ranges, cfg, name)
    }

    /// Whether the model carries its own quantizers (QuantizeLinear/DequantizeLinear).
    pub fn is_quantized(&self) -> bool {
        self.graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, graph::FOp::Quant(_)))
    }
}

/// Predictions of the integer model (the plaintext reference the engine equals).
pub fn predict_int(model: &Model, data: &Array) -> Result<Vec<usize>, ModelError> {
    (0..data.samples())
        .map(|i| {
            reference::evaluate(model, &model.input.quantize(data.sample(i)))
                .map(|l| reference::argmax(&l))
        })
        .collect()
}

/// Fraction of predictions equal to the labels.
pub fn accuracy(pred: &[usize], labels: &[usize]) -> f64 {
    let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / pred.len().max(1) as f64
}

/// Float accuracy by an independent ONNX runtime (tract), one sample at a time.
/// `nhwc`: the model's input is declared (N, H, W, C); samples are transposed to it.
pub fn predict_tract(path: &Path, data: &Array, nhwc: bool) -> Result<Vec<usize>, ImportError> {
    use tract_onnx::prelude::*;
    let err = |e: TractError| ImportError::Decode(format!("tract: {e:#}"));
    let [_, c, h, w] = data.shape[..] else {
        return Err(ImportError::Shape(format!(
            "data has shape {:?}; need (N, C, H, W)",
            data.shape
        )));
    };
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| {
            let shape = if nhwc { [1, h, w, c] } else { [1, c, h, w] };
            m.with_input_fact(0, f32::fact(shape).into())
        })
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(err)?;
    (0..data.samples())
        .map(|i| {
            let x = if nhwc {
                let s = data.sample(i);
                let t: Vec<f32> = (0..h * w * c).map(|j| s[(j % c) * h * w + j / c]).collect();
                Tensor::from_shape(&[1, h, w, c], &t)
            } else {
                Tensor::from_shape(&[1, c, h, w], data.sample(i))
            }
            .map_err(err)?;
            let out = model.run(tvec!(x.into())).map_err(err)?;
            let v: Vec<f32> = out[0]
                .to_array_view::<f32>()
                .map_err(err)?
                .iter()
                .copied()
                .collect();
            Ok(reference::argmax(&v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/onnx")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn damaged_models_are_errors_not_panics() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for name in [
            "digits_bn.onnx",
            "digits_res.onnx",
            "digits_keras.onnx",
            "qcdq_nobias_pow2.onnx",
            "float_folds.onnx",
            "ort_qdq_nobias.onnx",
            "recipe_cnn_2bit_nobias.onnx",
        ] {
            let good = fixture(name);
            assert!(parse_onnx(&good).is_ok());
            for _ in 0..300 {
                let mut b = good.clone();
                match rng.gen_range(0..3) {
                    0 => b.truncate(rng.gen_range(0..good.len())),
                    1 => {
                        for _ in 0..rng.gen_range(1..8) {
                            let i = rng.gen_range(0..b.len());
                            b[i] = rng.gen();
                        }
                    }
                    _ => {
                        let i = rng.gen_range(0..b.len());
                        b.insert(i, rng.gen());
                    }
                }
                // Ok (a flip in a float weight) or a clean error; a panic fails the test
                if let Ok(p) = parse_onnx(&b) {
                    let x = Array {
                        shape: vec![1, p.graph.input[0], p.graph.input[1], p.graph.input[2]],
                        data: vec![0.5; p.graph.input.iter().product()],
                    };
                    let _ = p.predict_float(&x);
                    if let Ok(r) = p.calibrate(&x) {
                        if let Ok(m) = p.quantize(&r, quantize::QuantConfig::default(), "fuzz") {
                            let _ = predict_int(&m, &x);
                        }
                    }
                }
            }
        }
    }
}
