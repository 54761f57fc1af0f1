//! Training data: the scikit-learn digits set (1797 8x8 grey images, ten classes).
//!
//! The file is not committed; `scripts/setup.sh` extracts it from the scikit-learn wheel
//! into `.cache/data` (or `$FHECAM_DATA_DIR`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// File name of the digits set inside the data directory.
pub const DIGITS_FILE: &str = "digits.csv.gz";

const DIGITS_SIDE: usize = 8;
const DIGITS_MAX: f32 = 16.0;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{file} not found (looked in: {}); run scripts/setup.sh to fetch it", list(.tried))]
    NotFound { file: String, tried: Vec<PathBuf> },
    #[error("reading {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {msg}", .path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}:{line}: expected {expected} comma-separated columns, found {found}", .path.display())]
    Columns {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error("{}: no samples", .path.display())]
    Empty { path: PathBuf },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Labelled images, each row-major (C, H, W) with intensities in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub images: Vec<Vec<f32>>,
    pub labels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Number of classes, i.e. the largest label + 1.
    pub fn num_classes(&self) -> usize {
        self.labels
            .iter()
            .map(|&l| l as usize + 1)
            .max()
            .unwrap_or(0)
    }
    /// The samples at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            images: idx.iter().map(|&i| self.images[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }
}

/// Directories searched for the data, in order: `$FHECAM_DATA_DIR`, `./.cache/data`, and
/// `.cache/data` under the workspace root (so tests work from any working directory).
pub fn data_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("FHECAM_DATA_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(".cache/data"));
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/data");
    if !dirs.contains(&crate_dir) {
        dirs.push(crate_dir);
    }
    dirs
}

/// Loads the digits set from the first data directory that has it.
pub fn load_digits() -> Result<Dataset, DataError> {
    let tried: Vec<PathBuf> = data_dirs()
        .into_iter()
        .map(|d| d.join(DIGITS_FILE))
        .collect();
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => load_digits_from(p),
        None => Err(DataError::NotFound {
            file: DIGITS_FILE.into(),
            tried,
        }),
    }
}

/// Loads a gzip-compressed digits CSV: one sample a line, 64 pixel values in 0..=16 then
/// the label in 0..=9.
pub fn load_digits_from(path: &Path) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    parse_digits_csv(GzDecoder::new(file), path)
}

/// Parses the (decompressed) digits CSV; `path` only names the source in errors.
pub fn parse_digits_csv(reader: impl Read, path: &Path) -> Result<Dataset, DataError> {
    let n_px = DIGITS_SIDE * DIGITS_SIDE;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split(',').collect();
        if cols.len() != n_px + 1 {
            return Err(DataError::Columns {
                path: path.into(),
                line: line_no,
                expected: n_px + 1,
                found: cols.len(),
            });
        }
        let parse_err = |col: usize, msg: String| DataError::Parse {
            path: path.into(),
            line: line_no,
            msg: format!("column {}: {msg}", col + 1),
        };
        let mut img = Vec::with_capacity(n_px);
        for (c, v) in cols[..n_px].iter().enumerate() {
            // Some copies store the pixels as floats ("3.0"); accept those if integral.
            let x: f32 = v
                .trim()
                .parse()
                .map_err(|e| parse_err(c, format!("{v:?} is not a number ({e})")))?;
            if !(0.0..=DIGITS_MAX).contains(&x) || x.fract() != 0.0 {
                return Err(parse_err(
                    c,
                    format!("pixel {v:?} is not an integer in 0..=16"),
                ));
            }
            img.push(x / DIGITS_MAX);
        }
        let lv = cols[n_px].trim();
        let label: f32 = lv
            .parse()
            .map_err(|e| parse_err(n_px, format!("label {lv:?} is not a number ({e})")))?;
        if !(0.0..=9.0).contains(&label) || label.fract() != 0.0 {
            return Err(parse_err(
                n_px,
                format!("label {lv:?} is not an integer in 0..=9"),
            ));
        }
        images.push(img);
        labels.push(label as u8);
    }
    if labels.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(Dataset {
        images,
        labels,
        channels: 1,
        height: DIGITS_SIDE,
        width: DIGITS_SIDE,
    })
}

/// Splits into (train, test) keeping class proportions: each class's samples are shuffled
/// with a seeded ChaCha8 generator and the first round(n * test_fraction) go to test.
/// Deterministic for a given seed; both halves keep the original sample order.
pub fn stratified_split(ds: &Dataset, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
    let frac = test_fraction.clamp(0.0, 1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train_idx = Vec::new();
    let mut test_idx = Vec::new();
    for class in 0..ds.num_classes() {
        let mut idx: Vec<usize> = (0..ds.len())
            .filter(|&i| ds.labels[i] as usize == class)
            .collect();
        idx.shuffle(&mut rng);
        let n_test = (idx.len() as f64 * frac).round() as usize;
        test_idx.extend_from_slice(&idx[..n_test]);
        train_idx.extend_from_slice(&idx[n_test..]);
    }
    train_idx.sort_unstable();
    test_idx.sort_unstable();
    (ds.subset(&train_idx), ds.subset(&test_idx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(px: u8, label: u8) -> String {
        let mut cols = vec![px.to_string(); 64];
        cols.push(label.to_string());
        cols.join(",")
    }

    #[test]
    fn parses_and_scales() {
        let csv = format!("{}\n{}\n", row(16, 3), row(8, 0));
        let ds = parse_digits_csv(csv.as_bytes(), Path::new("x.csv")).unwrap();
        assert_eq!(ds.labels, vec![3, 0]);
        assert_eq!(ds.images[0], vec![1.0; 64]);
        assert_eq!(ds.images[1], vec![0.5; 64]);
        assert_eq!((ds.channels, ds.height, ds.width), (1, 8, 8));
    }

    #[test]
    fn reports_line_and_columns() {
        let csv = format!("{}\n1,2,3\n", row(1, 1));
        let e = parse_digits_csv(csv.as_bytes(), Path::new("d.csv")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "d.csv:2: expected 65 comma-separated columns, found 3"
        );
        let csv = row(1, 1).replacen('1', "x", 1);
        let e = parse_digits_csv(csv.as_bytes(), Path::new("d.csv")).unwrap_err();
        assert!(e.to_string().starts_with("d.csv:1: column 1:"), "{e}");
        let e = parse_digits_csv(row(17, 1).as_bytes(), Path::new("d.csv")).unwrap_err();
        assert!(e.to_string().contains("0..=16"), "{e}");
    }

    #[test]
    fn missing_file_mentions_setup() {
        let e = DataError::NotFound {
            file: DIGITS_FILE.into(),
            tried: vec![PathBuf::from("/nowhere/digits.csv.gz")],
        };
        assert!(e.to_string().contains("run scripts/setup.sh"));
    }

    #[test]
    fn split_is_stratified_and_deterministic() {
        let n = 40;
        let ds = Dataset {
            images: (0..n).map(|i| vec![i as f32]).collect(),
            labels: (0..n).map(|i| (i % 4) as u8).collect(),
            channels: 1,
            height: 1,
            width: 1,
        };
        let (tr, te) = stratified_split(&ds, 0.25, 7);
        assert_eq!((tr.len(), te.len()), (28, 12));
        for c in 0..4u8 {
            assert_eq!(te.labels.iter().filter(|&&l| l == c).count(), 3);
        }
        let mut all: Vec<f32> = tr.images.iter().chain(&te.images).map(|v| v[0]).collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, (0..n).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(stratified_split(&ds, 0.25, 7), (tr, te.clone()));
        assert_ne!(stratified_split(&ds, 0.25, 8).1, te);
    }
}
