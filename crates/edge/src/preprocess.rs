//! Camera frame → the model's integer input: grey (or RGB) conversion, resize to the model's
//! H×W with area interpolation, intensities in [0, 1], then `InputSpec::quantize`.

use fhecam_engine::model::InputSpec;
use opencv::core::{Mat, Size, Vector, CV_16U, CV_32F, CV_8U};
use opencv::prelude::*;
use opencv::{imgcodecs, imgproc};
use std::path::Path;
use thiserror::Error;

/// Largest image file read (a 4K PNG is well under this).
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum PreprocessError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, over the {MAX_IMAGE_FILE_BYTES}-byte image limit")]
    TooLarge { path: String, size: u64 },
    #[error("{path}: not an image OpenCV can decode")]
    Undecodable { path: String },
    #[error("the model takes {0} input channels; only 1 (grey) and 3 (RGB) are supported")]
    Channels(usize),
    #[error(
        "image has {channels} channels of depth {depth}: expected 8- or 16-bit grey, BGR or BGRA"
    )]
    Format { channels: i32, depth: i32 },
    #[error("empty image")]
    Empty,
    #[error("OpenCV: {0}")]
    Cv(#[from] opencv::Error),
}

/// Intensities in [0, 1], row-major (C, H, W), of `img` resized to the model's input. `img`
/// is grey, BGR or BGRA (as OpenCV decodes), 8- or 16-bit. For a 3-channel model the planes
/// are R, G, B.
pub fn intensities(img: &Mat, spec: &InputSpec) -> Result<Vec<f32>, PreprocessError> {
    if img.empty() || img.rows() == 0 || img.cols() == 0 {
        return Err(PreprocessError::Empty);
    }
    let (channels, depth) = (img.channels(), img.depth());
    let full = match depth {
        CV_8U => 255.0,
        CV_16U => 65535.0,
        _ => return Err(PreprocessError::Format { channels, depth }),
    };
    let code = match (spec.channels, channels) {
        (1, 1) | (3, 3) => None,
        (1, 3) => Some(imgproc::COLOR_BGR2GRAY),
        (1, 4) => Some(imgproc::COLOR_BGRA2GRAY),
        (3, 1) => Some(imgproc::COLOR_GRAY2BGR),
        (3, 4) => Some(imgproc::COLOR_BGRA2BGR),
        (1 | 3, _) => return Err(PreprocessError::Format { channels, depth }),
        (c, _) => return Err(PreprocessError::Channels(c)),
    };
    let converted;
    let src = match code {
        Some(code) => {
            let mut m = Mat::default();
            imgproc::cvt_color_def(img, &mut m, code)?;
            converted = m;
            &converted
        }
        None => img,
    };
    let (h, w) = (spec.height as i32, spec.width as i32);
    let resized;
    let src = if src.rows() != h || src.cols() != w {
        let mut m = Mat::default();
        // INTER_AREA averages the source pixels each output pixel covers: no aliasing when
        // a camera frame shrinks to a few dozen pixels.
        imgproc::resize(src, &mut m, Size::new(w, h), 0.0, 0.0, imgproc::INTER_AREA)?;
        resized = m;
        &resized
    } else {
        src
    };
    let mut f = Mat::default();
    // unscaled: the division below is the same f32 division the training data went through
    src.convert_to(&mut f, CV_32F, 1.0, 0.0)?;
    let f = if f.is_continuous() { f } else { f.try_clone()? };
    // bytes, not data_typed: that one refuses multi-channel matrices
    let hwc: Vec<f32> = f
        .data_bytes()?
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) / full as f32)
        .collect();
    let c = spec.channels;
    let plane = spec.height * spec.width;
    let mut out = vec![0f32; c * plane];
    for (i, px) in hwc.chunks_exact(c).enumerate() {
        for (k, &v) in px.iter().enumerate() {
            // OpenCV's BGR order → the model's RGB planes.
            let ch = if c == 3 { 2 - k } else { k };
            out[ch * plane + i] = v.clamp(0.0, 1.0);
        }
    }
    Ok(out)
}

/// The model's quantized input for a decoded image.
pub fn preprocess(img: &Mat, spec: &InputSpec) -> Result<Vec<u8>, PreprocessError> {
    Ok(spec.quantize(&intensities(img, spec)?))
}

/// Decodes an image file (size-limited) as OpenCV would `imread` it: 8- or 16-bit, grey,
/// BGR or BGRA.
pub fn read_image(path: &Path) -> Result<Mat, PreprocessError> {
    let p = path.display().to_string();
    let bytes =
        fhecam_proto::files::read_limited(path, MAX_IMAGE_FILE_BYTES).map_err(|e| match e {
            fhecam_proto::files::ReadError::TooLarge { size, .. } => PreprocessError::TooLarge {
                path: p.clone(),
                size,
            },
            fhecam_proto::files::ReadError::Io(source) => PreprocessError::Io {
                path: p.clone(),
                source,
            },
        })?;
    let buf = Vector::<u8>::from_slice(&bytes);
    let img = imgcodecs::imdecode(&buf, imgcodecs::IMREAD_UNCHANGED)?;
    if img.empty() {
        return Err(PreprocessError::Undecodable { path: p });
    }
    Ok(img)
}

/// Reads an image file and returns the model's quantized input.
pub fn preprocess_file(path: &Path, spec: &InputSpec) -> Result<Vec<u8>, PreprocessError> {
    preprocess(&read_image(path)?, spec)
}

/// Encodes 8-bit grey pixels (row-major, `height` rows) as PNG; for tests and tools.
pub fn encode_grey_png(pixels: &[u8], height: usize) -> Result<Vec<u8>, PreprocessError> {
    if height == 0 || pixels.is_empty() || !pixels.len().is_multiple_of(height) {
        return Err(PreprocessError::Empty);
    }
    let m = Mat::new_rows_cols_with_data(height as i32, (pixels.len() / height) as i32, pixels)?;
    let mut out = Vector::<u8>::new();
    imgcodecs::imencode_def(".png", &m, &mut out)?;
    Ok(out.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(c: usize, h: usize, w: usize) -> InputSpec {
        InputSpec {
            channels: c,
            height: h,
            width: w,
            bits: 2,
            scale: 1.0 / 3.0,
            zero: 0.0,
        }
    }

    #[test]
    fn grey_png_round_trip_and_area_resize() {
        let px: Vec<u8> = (0..64).map(|i| (i * 4) as u8).collect();
        let png = encode_grey_png(&px, 8).unwrap();
        let img = imgcodecs::imdecode(&Vector::<u8>::from_slice(&png), imgcodecs::IMREAD_UNCHANGED)
            .unwrap();
        let v = intensities(&img, &spec(1, 8, 8)).unwrap();
        let want: Vec<f32> = px.iter().map(|&p| p as f32 / 255.0).collect();
        assert_eq!(v, want);
        // 8x8 → 4x4: each output is the mean of a 2x2 block
        let v = intensities(&img, &spec(1, 4, 4)).unwrap();
        let mean = (px[0] as f32 + px[1] as f32 + px[8] as f32 + px[9] as f32) / 4.0 / 255.0;
        assert!((v[0] - mean).abs() < 1.0 / 255.0, "{} vs {mean}", v[0]);
        assert_eq!(preprocess(&img, &spec(1, 8, 8)).unwrap().len(), 64);
    }

    #[test]
    fn colour_becomes_grey_or_rgb_planes() {
        // one BGR pixel: blue 0, green 0, red 255
        let m = Mat::new_rows_cols_with_data(1, 3, &[0u8, 0, 255]).unwrap();
        let bgr = m.reshape(3, 1).unwrap().try_clone().unwrap();
        let rgb = intensities(&bgr, &spec(3, 1, 1)).unwrap();
        assert_eq!(rgb, vec![1.0, 0.0, 0.0]);
        let grey = intensities(&bgr, &spec(1, 1, 1)).unwrap();
        assert!((grey[0] - 0.299).abs() < 0.01, "{grey:?}");
        assert!(matches!(
            intensities(&bgr, &spec(2, 1, 1)),
            Err(PreprocessError::Channels(2))
        ));
    }
}
