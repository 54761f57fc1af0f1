//! Constant folding: a node whose inputs are all constants (initializers, Constant nodes,
//! or constants folded before it) becomes a constant, whatever exporter wrote it —
//! `Transpose` of a weight (PyTorch's bias-less `Linear` through a quantizer writes
//! DequantizeLinear → Transpose → MatMul), `Reshape`, `Cast`, `Squeeze`/`Unsqueeze`, `Mul`
//! or `Div` by a constant scale…
//!
//! Dequantized weights stay quantized through folding: a constant carries, per element,
//! the scale its integer is on (see [`Const::deq`]); a permutation or reshape moves the
//! scales with the values, a multiplication by a constant multiplies them.

use super::onnx::{int_range, Attrs, Const};
use tract_onnx::pb::{tensor_proto::DataType, NodeProto};

/// Operators folded when all their inputs are constants.
pub(super) const FOLDED: &[&str] = &[
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "Neg",
    "Mul",
    "Div",
    "Add",
    "Sub",
];

/// Most elements of a folded constant (a broadcast can grow a tensor).
pub(super) const FOLD_LIMIT: usize = 1 << 24;

/// The constant `node` computes from its constant inputs (`None`: an optional input left
/// out), or why it cannot.
pub(super) fn fold(node: &NodeProto, ins: &[Option<Const>]) -> Result<Const, String> {
    let a = Attrs(node);
    let x = ins.first().cloned().flatten().ok_or("input 0 is missing")?;
    let arg = |k: usize| ins.get(k).cloned().flatten();
    match node.op_type.as_str() {
        "Transpose" => {
            let perm = a
                .ints("perm")
                .unwrap_or_else(|| (0..x.dims.len() as i64).rev().collect());
            transpose(x, &perm)
        }
        "Reshape" => {
            let shape = arg(1).ok_or("the target shape is missing")?;
            let dims = reshape_dims(&x.dims, &shape.i, a.int("allowzero", 0) != 0)?;
            Ok(Const { dims, ..x })
        }
        "Flatten" => {
            let r = x.dims.len() as i64;
            let axis = a.int("axis", 1);
            let axis = if axis < 0 { axis + r } else { axis };
            if !(0..=r).contains(&axis) {
                return Err(format!("axis {axis} is outside 0..={r}"));
            }
            let (h, t) = x.dims.split_at(axis as usize);
            let dims = vec![h.iter().product(), t.iter().product()];
            Ok(Const { dims, ..x })
        }
        "Squeeze" | "Unsqueeze" => {
            let axes = match arg(1) {
                Some(c) => Some(c.i),
                None => a.ints("axes"),
            };
            let dims = if node.op_type == "Squeeze" {
                squeeze_dims(&x.dims, axes.as_deref())?
            } else {
                unsqueeze_dims(&x.dims, &axes.ok_or("axes are missing")?)?
            };
            Ok(Const { dims, ..x })
        }
        "Cast" => cast(x, a.int("to", 0) as i32),
        "Neg" => Ok(Const {
            f: x.f.iter().map(|v| -v).collect(),
            i: x.i.iter().map(|v| -v).collect(),
            ..x
        }),
        op @ ("Mul" | "Div" | "Add" | "Sub") => {
            binary(op, &x, &arg(1).ok_or("input 1 is missing")?)
        }
        other => Err(format!("{other} is not folded")),
    }
}

/// Row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for k in (0..dims.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * dims[k + 1];
    }
    s
}

/// Element `k` of a tensor of `dims` as its multi-index.
fn unravel(mut k: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (j, &d) in dims.iter().enumerate().rev() {
        idx[j] = k % d.max(1);
        k /= d.max(1);
    }
    idx
}

/// The values (and integers, and scales) of `x` taken at the source indices `src`.
fn gather(x: &Const, src: &[usize], dims: Vec<usize>) -> Const {
    let pick = |v: &[f32]| src.iter().map(|&k| v[k]).collect::<Vec<f32>>();
    Const {
        dims,
        f: pick(&x.f),
        i: if x.i.is_empty() {
            vec![]
        } else {
            src.iter().map(|&k| x.i[k]).collect()
        },
        ty: x.ty,
        deq: x.deq.as_deref().map(pick),
    }
}

fn transpose(x: Const, perm: &[i64]) -> Result<Const, String> {
    let r = x.dims.len();
    let mut seen = vec![false; r];
    let ok = perm.len() == r
        && perm.iter().all(|&p| {
            let fresh = (0..r as i64).contains(&p) && !seen[p as usize];
            if fresh {
                seen[p as usize] = true;
            }
            fresh
        });
    if !ok {
        return Err(format!(
            "perm {perm:?} is not a permutation of the {r} axes of a constant of shape {:?}",
            x.dims
        ));
    }
    let perm: Vec<usize> = perm.iter().map(|&p| p as usize).collect();
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims[p]).collect();
    let st = strides(&x.dims);
    let src: Vec<usize> = (0..x.f.len())
        .map(|k| {
            let idx = unravel(k, &dims);
            idx.iter().zip(&perm).map(|(&i, &p)| i * st[p]).sum()
        })
        .collect();
    Ok(gather(&x, &src, dims))
}

/// ONNX Reshape's target: 0 copies the input's dimension (unless `allowzero`), one -1 is
/// inferred.
fn reshape_dims(dims: &[usize], shape: &[i64], allowzero: bool) -> Result<Vec<usize>, String> {
    let n: usize = dims.iter().product();
    let bad = || format!("cannot reshape a constant of shape {dims:?} to {shape:?}");
    if shape.iter().filter(|&&d| d == -1).count() > 1 || shape.iter().any(|&d| d < -1) {
        return Err(bad());
    }
    let mut out: Vec<Option<usize>> = Vec::with_capacity(shape.len());
    for (k, &d) in shape.iter().enumerate() {
        out.push(match d {
            -1 => None,
            0 if !allowzero => Some(*dims.get(k).ok_or_else(bad)?),
            d => Some(d as usize),
        });
    }
    let known = out
        .iter()
        .flatten()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(bad)?;
    let dims: Vec<usize> = out
        .iter()
        .map(|d| d.unwrap_or(n.checked_div(known).unwrap_or(0)))
        .collect();
    if dims.iter().product::<usize>() != n {
        return Err(bad());
    }
    Ok(dims)
}

/// Axes of a rank-`r` tensor, negative ones counted from the end.
fn axes_of(axes: &[i64], r: usize) -> Result<Vec<usize>, String> {
    let mut out: Vec<usize> = Vec::with_capacity(axes.len());
    for &a in axes {
        let k = if a < 0 { a + r as i64 } else { a };
        if !(0..r as i64).contains(&k) || out.contains(&(k as usize)) {
            return Err(format!("axes {axes:?} do not fit rank {r}"));
        }
        out.push(k as usize);
    }
    Ok(out)
}

fn squeeze_dims(dims: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>, String> {
    let Some(axes) = axes else {
        return Ok(dims.iter().copied().filter(|&d| d != 1).collect());
    };
    let axes = axes_of(axes, dims.len())?;
    if let Some(a) = axes.iter().find(|&&a| dims[a] != 1) {
        return Err(format!(
            "axis {a} of a constant of shape {dims:?} is not 1: it cannot be squeezed"
        ));
    }
    Ok(dims
        .iter()
        .enumerate()
        .filter(|(k, _)| !axes.contains(k))
        .map(|(_, &d)| d)
        .collect())
}

fn unsqueeze_dims(dims: &[usize], axes: &[i64]) -> Result<Vec<usize>, String> {
    let r = dims.len() + axes.len();
    let axes = axes_of(axes, r)?;
    let mut rest = dims.iter();
    Ok((0..r)
        .map(|k| {
            if axes.contains(&k) {
                1
            } else {
                *rest.next().unwrap()
            }
        })
        .collect())
}

fn cast(x: Const, to: i32) -> Result<Const, String> {
    match DataType::from_i32(to) {
        Some(DataType::Float | DataType::Double) => Ok(Const {
            i: vec![],
            ty: DataType::Float as i32,
            ..x
        }),
        Some(
            ty @ (DataType::Int8
            | DataType::Uint8
            | DataType::Int16
            | DataType::Uint16
            | DataType::Int32
            | DataType::Int64),
        ) => {
            let (lo, hi) = int_range(to).unwrap_or(match ty {
                DataType::Int32 => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            });
            let i: Vec<i64> = if x.i.is_empty() {
                x.f.iter().map(|v| v.trunc() as i64).collect()
            } else {
                x.i.clone()
            };
            if let Some((k, v)) =
                x.f.iter().enumerate().find(|(k, v)| {
                    !v.is_finite() || !(lo as f64..=hi as f64).contains(&(i[*k] as f64))
                })
            {
                return Err(format!(
                    "element {k} ({v}) does not fit the {ty:?} it is cast to"
                ));
            }
            Ok(Const {
                dims: x.dims,
                f: i.iter().map(|&v| v as f32).collect(),
                i,
                ty: to,
                deq: None,
            })
        }
        _ => Err(format!(
            "Cast to data type {to}: fhecam folds casts to float32/float64 and to integer types"
        )),
    }
}

/// The output shape of a broadcast, and per output element the elements of each operand
/// it reads.
type Broadcast = (Vec<usize>, Vec<usize>, Vec<usize>);

/// Multidirectional (numpy) broadcasting of shapes `a` and `b`.
fn broadcast(a: &[usize], b: &[usize]) -> Result<Broadcast, String> {
    let r = a.len().max(b.len());
    let pad = |d: &[usize]| -> Vec<usize> {
        let mut v = vec![1; r - d.len()];
        v.extend_from_slice(d);
        v
    };
    let (pa, pb) = (pad(a), pad(b));
    let mut dims = Vec::with_capacity(r);
    for (&x, &y) in pa.iter().zip(&pb) {
        dims.push(match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        });
    }
    let n = dims
        .iter()
        .try_fold(1usize, |s, &d| s.checked_mul(d))
        .filter(|&n| n <= FOLD_LIMIT)
        .ok_or(format!(
            "broadcasting {a:?} with {b:?} makes a constant over {FOLD_LIMIT} elements"
        ))?;
    let (sa, sb) = (strides(&pa), strides(&pb));
    let at = |idx: &[usize], p: &[usize], s: &[usize]| -> usize {
        idx.iter()
            .zip(p)
            .zip(s)
            .map(|((&i, &d), &st)| if d == 1 { 0 } else { i * st })
            .sum()
    };
    let (mut ia, mut ib) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for k in 0..n {
        let idx = unravel(k, &dims);
        ia.push(at(&idx, &pa, &sa));
        ib.push(at(&idx, &pb, &sb));
    }
    Ok((dims, ia, ib))
}

/// `a op b` element-wise with broadcasting. Integers stay integers (ONNX's truncating
/// integer division); a dequantized constant times (or over) a float constant stays
/// quantized, on its scales times (over) that constant's magnitude.
fn binary(op: &str, a: &Const, b: &Const) -> Result<Const, String> {
    let (dims, ia, ib) = broadcast(&a.dims, &b.dims)?;
    let ints = !a.i.is_empty() && !b.i.is_empty();
    let (f, i): (Vec<f32>, Vec<i64>) = if ints {
        let i: Vec<i64> = ia
            .iter()
            .zip(&ib)
            .map(|(&j, &k)| {
                let (x, y) = (a.i[j], b.i[k]);
                match op {
                    "Mul" => x.checked_mul(y),
                    "Div" => x.checked_div(y),
                    "Add" => x.checked_add(y),
                    _ => x.checked_sub(y),
                }
                .ok_or(format!(
                    "integer {op} of {x} and {y} overflows or divides by zero"
                ))
            })
            .collect::<Result<_, _>>()?;
        (i.iter().map(|&v| v as f32).collect(), i)
    } else {
        let f: Vec<f32> = ia
            .iter()
            .zip(&ib)
            .map(|(&j, &k)| {
                let (x, y) = (a.f[j], b.f[k]);
                match op {
                    "Mul" => x * y,
                    "Div" => x / y,
                    "Add" => x + y,
                    _ => x - y,
                }
            })
            .collect();
        if let Some(k) = f.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "{op} gives a non-finite value at element {k} ({} and {})",
                a.f[ia[k]], b.f[ib[k]]
            ));
        }
        (f, vec![])
    };
    // the scale each result is an integer on, where it still is one
    let scaled = |s: &[f32], c: &Const, ic: &[usize], is: &[usize], div: bool| {
        let out: Vec<f32> = is
            .iter()
            .zip(ic)
            .map(|(&j, &k)| {
                let m = c.f[k].abs();
                if div {
                    s[j] / m
                } else {
                    s[j] * m
                }
            })
            .collect();
        out.iter().all(|v| v.is_finite() && *v > 0.0).then_some(out)
    };
    let deq = match (op, &a.deq, &b.deq) {
        ("Mul", Some(s), None) if b.i.is_empty() => scaled(s, b, &ib, &ia, false),
        ("Mul", None, Some(s)) if a.i.is_empty() => scaled(s, a, &ia, &ib, false),
        ("Div", Some(s), None) if b.i.is_empty() => scaled(s, b, &ib, &ia, true),
        _ => None,
    };
    let ty = if ints { a.ty } else { DataType::Float as i32 };
    Ok(Const {
        dims,
        f,
        i,
        ty,
        deq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(dims: &[usize], f: &[f32]) -> Const {
        Const {
            dims: dims.to_vec(),
            f: f.to_vec(),
            i: vec![],
            ty: DataType::Float as i32,
            deq: None,
        }
    }

    #[test]
    fn transposes_move_values_and_scales_together() {
        let mut x = c(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        x.deq = Some(vec![0.5, 0.5, 0.5, 0.25, 0.25, 0.25]);
        let t = transpose(x, &[1, 0]).unwrap();
        assert_eq!(t.dims, [3, 2]);
        assert_eq!(t.f, [1., 4., 2., 5., 3., 6.]);
        assert_eq!(t.deq.unwrap(), [0.5, 0.25, 0.5, 0.25, 0.5, 0.25]);
        let x = c(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
        let t = transpose(x, &[2, 0, 1]).unwrap();
        assert_eq!(t.dims, [3, 2, 1]);
        assert_eq!(t.f, [1., 4., 2., 5., 3., 6.]);
        assert!(transpose(c(&[2, 3], &[0.; 6]), &[0, 0]).is_err());
        assert!(transpose(c(&[2, 3], &[0.; 6]), &[0, 1, 2]).is_err());
    }

    #[test]
    fn shapes_fold_as_onnx_defines_them() {
        assert_eq!(reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(), [2, 12]);
        assert_eq!(reshape_dims(&[2, 3, 4], &[4, 6], false).unwrap(), [4, 6]);
        assert!(reshape_dims(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(reshape_dims(&[2, 3], &[-1, -1], false).is_err());
        assert!(reshape_dims(&[2, 3], &[-2, 3], false).is_err());
        assert_eq!(squeeze_dims(&[1, 3, 1], None).unwrap(), [3]);
        assert_eq!(squeeze_dims(&[1, 3, 1], Some(&[-1])).unwrap(), [1, 3]);
        assert!(squeeze_dims(&[1, 3, 1], Some(&[1])).is_err());
        assert_eq!(unsqueeze_dims(&[3], &[0, -1]).unwrap(), [1, 3, 1]);
        assert!(unsqueeze_dims(&[3], &[5]).is_err());
    }

    #[test]
    fn scaling_a_dequantized_constant_keeps_it_quantized() {
        let mut w = c(&[2, 2], &[1., -2., 3., 0.]);
        w.deq = Some(vec![1.0; 4]);
        let s = c(&[2, 1], &[0.5, -0.25]);
        let m = binary("Mul", &w, &s).unwrap();
        assert_eq!(m.f, [0.5, -1., -0.75, 0.]);
        assert_eq!(m.deq.unwrap(), [0.5, 0.5, 0.25, 0.25]);
        let d = binary("Div", &w, &c(&[], &[4.0])).unwrap();
        assert_eq!(d.deq.unwrap(), [0.25; 4]);
        assert!(binary("Add", &w, &s).unwrap().deq.is_none());
        assert!(binary("Mul", &w, &c(&[], &[0.0])).unwrap().deq.is_none());
        assert!(binary("Div", &w, &c(&[], &[0.0])).is_err());
        assert!(binary("Mul", &w, &c(&[3], &[1., 2., 3.])).is_err());
        let big = c(&[1 << 13, 1], &vec![1.0; 1 << 13]);
        let wide = c(&[1, 1 << 12], &vec![1.0; 1 << 12]);
        assert!(binary("Mul", &big, &wide).is_err());
    }

    #[test]
    fn casts_check_their_range() {
        let x = c(&[3], &[1.7, -2.2, 300.0]);
        assert!(cast(x.clone(), DataType::Int8 as i32).is_err());
        let y = cast(x, DataType::Int32 as i32).unwrap();
        assert_eq!(y.i, [1, -2, 300]);
        assert!(cast(y, DataType::Float16 as i32).is_err());
    }
}
