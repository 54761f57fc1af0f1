//! Where a convolution's taps and a pooling window's inputs lie, for the encrypted engine.
//! The plaintext reference computes the same geometry its own way (a zero-padded copy), so
//! engine-versus-reference tests also test this.

use crate::model::ValueInfo;

/// Calls `f(in_channel, ky, kx, input_index)` for every tap of output (oy, ox) that falls
/// inside the input (padding taps are skipped: they multiply zero).
#[allow(clippy::too_many_arguments)]
pub fn for_each_tap(
    c: usize,
    h: usize,
    w: usize,
    k: [usize; 2],
    s: [usize; 2],
    p: [usize; 2],
    oy: usize,
    ox: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    for ic in 0..c {
        for ky in 0..k[0] {
            let iy = (oy * s[0] + ky) as i64 - p[0] as i64;
            if iy < 0 || iy >= h as i64 {
                continue;
            }
            for kx in 0..k[1] {
                let ix = (ox * s[1] + kx) as i64 - p[1] as i64;
                if ix < 0 || ix >= w as i64 {
                    continue;
                }
                f(ic, ky, kx, (ic * h + iy as usize) * w + ix as usize);
            }
        }
    }
}

/// Input indices of each pooling window, in output order.
pub fn pool_windows(ai: &ValueInfo, k: [usize; 2], s: [usize; 2]) -> Vec<Vec<usize>> {
    let [c, h, w] = ai.shape;
    let oh = (h - k[0]) / s[0] + 1;
    let ow = (w - k[1]) / s[1] + 1;
    let mut out = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut win = Vec::with_capacity(k[0] * k[1]);
                for ky in 0..k[0] {
                    for kx in 0..k[1] {
                        win.push((ch * h + oy * s[0] + ky) * w + ox * s[1] + kx);
                    }
                }
                out.push(win);
            }
        }
    }
    out
}
