//! NumPy `.npy` float32 arrays (what `np.save` writes) and label files, for calibration and
//! evaluation data brought from PyTorch or Keras.

use std::path::Path;
use thiserror::Error;

/// Largest data file read (a calibration or test set of small images).
pub const NPY_LIMIT: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
}

/// A dense float32 array in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Array {
    /// Number of samples (the first axis).
    pub fn samples(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
    /// Values per sample.
    pub fn sample_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
    /// Checks that this holds at least one (C, H, W) sample of finite values.
    pub fn check_samples(&self, chw: [usize; 3], what: &str) -> Result<(), String> {
        let [c, h, w] = chw;
        if self.shape.len() != 4 || self.shape[1..] != chw || self.samples() == 0 {
            return Err(format!(
                "{what} has shape {:?}; the model takes (N, {c}, {h}, {w}) float32 samples",
                self.shape
            ));
        }
        if self.data.iter().any(|v| !v.is_finite()) {
            return Err(format!("{what} contains NaN or infinite values"));
        }
        Ok(())
    }

    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.sample_len();
        &self.data[i * n..(i + 1) * n]
    }

    /// Serializes as `.npy` version 1.0 (`<f4`, C order).
    pub fn to_npy(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!(
                "({})",
                self.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        // magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, NpyError> {
    fhecam_proto::files::read_limited(path, NPY_LIMIT).map_err(|e| match e {
        fhecam_proto::files::ReadError::TooLarge { size, .. } => NpyError::Format {
            path: path.display().to_string(),
            msg: format!("{size} bytes is over the {NPY_LIMIT}-byte limit for data files"),
        },
        fhecam_proto::files::ReadError::Io(source) => NpyError::Io {
            path: path.display().to_string(),
            source,
        },
    })
}

/// Reads a `.npy` file of float32 (or float64, converted) values.
pub fn read(path: &Path) -> Result<Array, NpyError> {
    let bytes = read_limited(path)?;
    parse(&bytes).map_err(|msg| NpyError::Format {
        path: path.display().to_string(),
        msg,
    })
}

pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a NumPy .npy file (save the array with numpy.save)".into());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-text .npy header")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or(format!("header has no '{key}'"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let width = if descr.starts_with("'<f4'") || descr.starts_with("'float32'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(format!(
            "dtype {} is not float32 (convert with x.astype(numpy.float32))",
            descr.split(',').next().unwrap_or(descr)
        ));
    };
    if field("fortran_order")?.starts_with("True") {
        return Err(
            "Fortran-ordered arrays are not supported (use numpy.ascontiguousarray)".into(),
        );
    }
    let shape_src = field("shape")?;
    let close = shape_src.find(')').ok_or("malformed shape in header")?;
    let shape: Vec<usize> = shape_src[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    let body = &bytes[start + hlen..];
    if body.len() != count * width {
        return Err(format!(
            "shape {shape:?} needs {} data bytes, the file has {} (truncated?)",
            count * width,
            body.len()
        ));
    }
    let data = if width == 4 {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect()
    };
    Ok(Array { shape, data })
}

/// Reads labels: one non-negative integer per line (blank lines ignored).
pub fn read_labels(path: &Path) -> Result<Vec<usize>, NpyError> {
    let bytes = read_limited(path)?;
    let fmt = |msg: String| NpyError::Format {
        path: path.display().to_string(),
        msg,
    };
    let text = String::from_utf8(bytes).map_err(|_| fmt("labels are not text".into()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            l.trim().parse::<usize>().map_err(|_| {
                fmt(format!(
                    "line {}: {:?} is not a class index (one integer per line)",
                    i + 1,
                    l.trim()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let a = Array {
            shape: vec![2, 1, 2, 3],
            data: (0..12).map(|v| v as f32 * 0.5).collect(),
        };
        let bytes = a.to_npy();
        assert_eq!(bytes.len() % 16, 0);
        assert_eq!(parse(&bytes).unwrap(), a);
        assert_eq!(a.sample(1), &a.data[6..]);
        assert!(parse(&bytes[..bytes.len() - 4])
            .unwrap_err()
            .contains("truncated"));
        assert!(parse(b"PK\x03\x04 not npy")
            .unwrap_err()
            .contains("numpy.save"));
        let mut ints = bytes.clone();
        let at = ints.windows(3).position(|w| w == b"<f4").unwrap();
        ints[at..at + 3].copy_from_slice(b"<i8");
        assert!(parse(&ints).unwrap_err().contains("float32"));
    }
}
