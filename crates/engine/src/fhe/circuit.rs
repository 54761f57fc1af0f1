//! Exact integer circuits over 4-bit TFHE blocks, with bound and noise accounting.
//!
//! Every value carries the interval its message lies in and its noise *variance* in units of
//! a fresh ciphertext (a PBS output or a fresh encryption). tfhe's default 2_2 parameters
//! are optimised for a linear combination of 2-norm 5 before each PBS (p-fail ≤ 2^-129.6),
//! i.e. Σ cᵢ² ≤ 25 over independent fresh inputs; every PBS input here is checked
//! against that budget and against the 0..16 message window, so the p-fail guarantee of
//! the parameter set holds for every bootstrapping the engine performs.
//!
//! The building blocks:
//! - a product `w·x` of a 2-bit weight and a 2-bit activation is one bivariate PBS on
//!   `4u + x` (variance 16 + var(x));
//! - sums are kept as an [`Acc`]: base-4 columns of leveled sums, each column packed into
//!   blocks of at most 15 and variance 25, carried upward by PBS only when needed
//!   (one many-LUT PBS splits a block ≤ 7 into digit and carry);
//! - an activation table over a wide accumulator is a sum of steps, each a lexicographic
//!   comparison of the accumulator's digits with a clear threshold, one PBS per digit;
//! - max is one bivariate PBS per pair.

use super::backend::{Backend, BLOCK};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Σ cᵢ² a PBS input may carry (the parameter set's 2-norm bound, squared).
pub const NOISE_BUDGET: u64 = 25;

#[derive(Debug, Error, PartialEq)]
pub enum CircuitError {
    #[error("activation table changes level {0} times over the accumulator range; at most 45 changes are supported (smooth or monotone tables need at most 3)")]
    TableTooIrregular(usize),
}

/// A ciphertext with the integer interval its message lies in and its noise variance.
#[derive(Clone, Debug)]
pub struct Val<C> {
    pub ct: C,
    pub lo: i64,
    pub hi: i64,
    pub var: u64,
}

/// Wraps a backend with PBS counting and the bound checks every circuit relies on.
pub struct Engine<B: Backend> {
    pub backend: B,
    pbs: AtomicU64,
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B) -> Self {
        Engine {
            backend,
            pbs: AtomicU64::new(0),
        }
    }

    /// PBS performed since creation.
    pub fn pbs_count(&self) -> u64 {
        self.pbs.load(Ordering::Relaxed)
    }

    /// A fresh input (encryption or PBS output) holding a value in `lo..=hi`.
    pub fn fresh(&self, ct: B::Ct, lo: i64, hi: i64) -> Val<B::Ct> {
        Val { ct, lo, hi, var: 1 }
    }

    pub fn constant(&self, v: i64) -> Val<B::Ct> {
        Val {
            ct: self.backend.trivial(v.rem_euclid(32) as u64),
            lo: v,
            hi: v,
            var: 0,
        }
    }

    pub fn add(&self, mut a: Val<B::Ct>, b: &Val<B::Ct>) -> Val<B::Ct> {
        self.backend.add_assign(&mut a.ct, &b.ct);
        a.lo += b.lo;
        a.hi += b.hi;
        a.var += b.var;
        a
    }

    pub fn add_const(&self, mut a: Val<B::Ct>, k: i64) -> Val<B::Ct> {
        self.backend
            .add_const_assign(&mut a.ct, k.rem_euclid(32) as u64);
        a.lo += k;
        a.hi += k;
        a
    }

    pub fn scale(&self, mut a: Val<B::Ct>, k: u64) -> Val<B::Ct> {
        self.backend.scalar_mul_assign(&mut a.ct, k);
        a.lo *= k as i64;
        a.hi *= k as i64;
        a.var *= k * k;
        a
    }

    /// `a * 4 + b`: packs two 2-bit values into one block for a bivariate PBS.
    pub fn pack(&self, a: &Val<B::Ct>, b: &Val<B::Ct>) -> Val<B::Ct> {
        let hi = self.scale(a.clone(), 4);
        self.add(hi, b)
    }

    fn check_input(&self, a: &Val<B::Ct>, window: u64) {
        assert!(
            a.lo >= 0 && (a.hi as u64) < window && a.var <= NOISE_BUDGET,
            "PBS input out of budget: {}..={} (window {window}), variance {}",
            a.lo,
            a.hi,
            a.var
        );
    }

    /// One PBS computing `f` on the message (f is only consulted on `a.lo..=a.hi`).
    pub fn lut(&self, a: &Val<B::Ct>, f: impl Fn(i64) -> i64) -> Val<B::Ct> {
        self.check_input(a, BLOCK);
        let (table, lo, hi) = table_of(a, &f);
        self.pbs.fetch_add(1, Ordering::Relaxed);
        Val {
            ct: self.backend.lut(&a.ct, &table),
            lo,
            hi,
            var: 1,
        }
    }

    /// One PBS computing several functions of the same message (the message must fit in
    /// 16 / n values; n is 2 or 4).
    pub fn many_lut(&self, a: &Val<B::Ct>, fs: &[&dyn Fn(i64) -> i64]) -> Vec<Val<B::Ct>> {
        assert!(fs.len() == 2 || fs.len() == 4);
        self.check_input(a, BLOCK / fs.len() as u64);
        let parts: Vec<_> = fs.iter().map(|f| table_of(a, f)).collect();
        let tables: Vec<_> = parts.iter().map(|p| p.0).collect();
        self.pbs.fetch_add(1, Ordering::Relaxed);
        self.backend
            .many_lut(&a.ct, &tables)
            .into_iter()
            .zip(parts)
            .map(|(ct, (_, lo, hi))| Val { ct, lo, hi, var: 1 })
            .collect()
    }

    /// Evaluates functions of one message with as few PBS as the message width allows.
    pub fn luts(&self, a: &Val<B::Ct>, fs: &[&dyn Fn(i64) -> i64]) -> Vec<Val<B::Ct>> {
        let per = if a.hi < 4 {
            4
        } else if a.hi < 8 {
            2
        } else {
            1
        };
        let mut out = Vec::with_capacity(fs.len());
        for chunk in fs.chunks(per) {
            match chunk.len() {
                1 => out.push(self.lut(a, chunk[0])),
                2 | 4 => out.extend(self.many_lut(a, chunk)),
                _ => {
                    // three functions: pad to four (same PBS cost) and drop the spare
                    let f3: &dyn Fn(i64) -> i64 = &|_| 0;
                    let mut v = self.many_lut(a, &[chunk[0], chunk[1], chunk[2], f3]);
                    v.truncate(3);
                    out.extend(v);
                }
            }
        }
        out
    }

    /// One PBS with a table the owner encrypted, holding `k` tables (many-LUT for k > 1):
    /// their entries at `a`, each in `0..=hi` with the noise of a secret-table output.
    pub fn secret_lut(&self, a: &Val<B::Ct>, t: &B::Table, k: usize, hi: i64) -> Vec<Val<B::Ct>> {
        // a trivial ciphertext would take tfhe's trivial path, which reads the encrypted
        // accumulator as if it were clear
        assert!(a.var > 0, "a secret table never reads a trivial ciphertext");
        self.check_input(a, BLOCK / k as u64);
        self.pbs.fetch_add(1, Ordering::Relaxed);
        let outs = self.backend.secret_lut(&a.ct, t, k);
        let val = |ct| Val {
            ct,
            lo: 0,
            hi,
            var: crate::layer::lut::SECRET_VAR,
        };
        outs.into_iter().map(val).collect()
    }

    /// A fresh copy of `a` with variance 1 (one PBS).
    pub fn refresh(&self, a: &Val<B::Ct>) -> Val<B::Ct> {
        self.lut(a, |v| v)
    }

    /// `w * x` as a non-negative value `w*x - pmin`, one PBS. `u` holds `w - wmin`.
    pub fn product(&self, u: &Val<B::Ct>, x: &Val<B::Ct>, wmin: i64, pmin: i64) -> Val<B::Ct> {
        let x = if 16 * u.var + x.var <= NOISE_BUDGET || 16 * x.var + u.var <= NOISE_BUDGET {
            x.clone()
        } else {
            self.refresh(x)
        };
        // Clamping to the operands' bounds keeps unreachable table entries from loosening
        // the output bound.
        let (uh, xh) = (u.hi, x.hi);
        if 16 * u.var + x.var <= NOISE_BUDGET {
            let p = self.pack(u, &x);
            self.lut(&p, |v| ((v >> 2).min(uh) + wmin) * (v & 3).min(xh) - pmin)
        } else {
            let p = self.pack(&x, u);
            self.lut(&p, |v| ((v & 3).min(uh) + wmin) * (v >> 2).min(xh) - pmin)
        }
    }

    /// max(a, b) of two values in 0..=3, one PBS (plus a refresh when both are noisy).
    pub fn max(&self, a: &Val<B::Ct>, b: &Val<B::Ct>) -> Val<B::Ct> {
        let (a, b) = if a.var <= b.var { (a, b) } else { (b, a) };
        let a = if 16 * a.var + b.var <= NOISE_BUDGET {
            a.clone()
        } else {
            self.refresh(a)
        };
        let p = self.pack(&a, b);
        self.lut(&p, |v| (v >> 2).max(v & 3))
    }

    /// Splits a block into its low base-4 digit and the carry (one PBS when the block is
    /// at most 7, else two).
    fn split(&self, a: &Val<B::Ct>) -> (Val<B::Ct>, Val<B::Ct>) {
        let lo: &dyn Fn(i64) -> i64 = &|v| v & 3;
        let hi: &dyn Fn(i64) -> i64 = &|v| v >> 2;
        let mut v = self.luts(a, &[lo, hi]);
        let h = v.pop().unwrap();
        (v.pop().unwrap(), h)
    }

    /// Whether a leveled sum can be carried by the next PBS: a block of 0..16 within the
    /// noise budget, or a 5-bit value 0..32 (padding bit included) quiet enough for
    /// [`Self::top_bit`].
    fn carriable(hi: i64, var: u64) -> bool {
        (hi < BLOCK as i64 && var <= NOISE_BUDGET) || (hi < 2 * BLOCK as i64 && var <= 9)
    }

    /// Sums values leveled into as few blocks as the window and the noise budget allow
    /// (first-fit decreasing). `cap` bounds what the column can truly hold.
    fn pack_column(&self, mut items: Vec<Val<B::Ct>>, cap: i64) -> Vec<Val<B::Ct>> {
        items.sort_by_key(|v| std::cmp::Reverse((v.hi, v.var)));
        let mut bins: Vec<Val<B::Ct>> = Vec::new();
        for it in items {
            let it = Val {
                hi: it.hi.min(cap),
                ..it
            };
            let slot = bins
                .iter_mut()
                .find(|b| Self::carriable((b.hi + it.hi).min(cap), b.var + it.var));
            match slot {
                Some(b) => {
                    let sum = self.add(b.clone(), &it);
                    *b = Val {
                        hi: sum.hi.min(cap),
                        ..sum
                    };
                }
                None => bins.push(it),
            }
        }
        bins
    }

    /// Splits a 5-bit value `v` (0..32, variance ≤ 9) with one PBS into `w = v mod 16`
    /// (same column) and `t = 4·[v ≥ 16]` (next column): the PBS reads the padding bit,
    /// where a constant table comes back negated.
    fn top_bit(&self, v: &Val<B::Ct>) -> (Val<B::Ct>, Val<B::Ct>) {
        assert!(v.lo >= 0 && v.hi < 2 * BLOCK as i64 && v.var <= 9);
        self.pbs.fetch_add(1, Ordering::Relaxed);
        let s = Val {
            ct: self.backend.sign_lut(&v.ct, 2),
            lo: -2,
            hi: 2,
            var: 1,
        };
        // w = v - 8 + 4s: v when s = +2, v - 16 when s = -2
        let w = self.add_const(self.add(v.clone(), &self.scale(s.clone(), 4)), -8);
        let w = Val {
            lo: 0,
            hi: v.hi.min(BLOCK as i64 - 1),
            ..w
        };
        let mut t = self.constant(2);
        self.backend.sub_assign(&mut t.ct, &s.ct);
        let t = Val {
            ct: t.ct,
            lo: 0,
            hi: 4,
            var: 1,
        };
        (w, t)
    }

    /// Carries an accumulator into base-4 digits `d_j` (each in 0..=3, variance ≤ 9) with
    /// `T = Σ 4^j d_j`.
    pub fn normalize(&self, acc: Acc<B::Ct>) -> Digits<B::Ct> {
        self.normalize_from(acc, 0)
    }

    /// [`Self::normalize`] for digits that leave the circuit: each is a fresh PBS output
    /// (variance 1) or a constant, what list compression's failure bound assumes.
    pub fn normalize_fresh(&self, acc: Acc<B::Ct>) -> Digits<B::Ct> {
        let mut d = self.normalize(acc);
        for v in &mut d.d {
            if v.var > 1 {
                *v = self.refresh(v);
            }
        }
        d
    }

    /// [`Self::normalize`] for a caller that only reads digits `from..`: the lower digits
    /// are carried but may be left noisier than 9.
    pub fn normalize_from(&self, acc: Acc<B::Ct>, from: usize) -> Digits<B::Ct> {
        let ndig = digits_for(acc.range);
        let mut cols = acc.cols;
        cols.resize_with(ndig.max(cols.len()), Vec::new);
        let mut digits = Vec::with_capacity(ndig);
        for j in 0..ndig {
            let cap = (acc.range >> (2 * j)) as i64;
            let mut col = std::mem::take(&mut cols[j]);
            let digit = loop {
                let mut bins = self.pack_column(col, cap);
                if bins.is_empty() {
                    break self.constant(0);
                }
                if bins.len() == 1 && bins[0].hi <= 3 {
                    let d = bins.pop().unwrap();
                    break if d.var > 9 && j >= from {
                        self.refresh(&d)
                    } else {
                        d
                    };
                }
                col = Vec::with_capacity(bins.len());
                for b in bins {
                    let (keep, carry) = if b.hi <= 3 && b.var <= 9 {
                        (b, None)
                    } else if b.hi < BLOCK as i64 {
                        let (lo, hi) = self.split(&b);
                        (lo, Some(hi))
                    } else {
                        let (w, t) = self.top_bit(&b);
                        (w, Some(t))
                    };
                    col.push(keep);
                    // carries out of the top digit are zero: the range says so
                    if let (Some(c), true) = (carry, j + 1 < ndig) {
                        cols[j + 1].push(c);
                    }
                }
            };
            digits.push(digit);
        }
        Digits {
            d: digits,
            offset: acc.offset,
            range: acc.range,
        }
    }

    /// Applies `g` (values in `0..4^nd`) exactly and returns its `nd` base-4 digits, least
    /// significant first. The accumulator is carried once; each output digit is its own
    /// table over it. `span` (in units of the accumulator's value S), when given, is where
    /// `g` may change: it is constant below and above.
    ///
    /// When every level change of `g` lies on one residue modulo 4^m, the accumulator is
    /// shifted by a clear constant so the changes fall on multiples of 4^m; comparisons
    /// then read only digits m and up (quantized tables are built that way, see `import`).
    pub fn apply_table_digits(
        &self,
        acc: Acc<B::Ct>,
        g: &dyn Fn(i64) -> i64,
        nd: usize,
        span: Option<(i64, i64)>,
    ) -> Result<Vec<Val<B::Ct>>, CircuitError> {
        self.apply_table(acc, g, nd, span, true)
    }

    /// [`Self::apply_table_digits`]; `ties`: a quantizer whose ties break its power-of-two
    /// step may be corrected first ([`TieFit`]), where that plans fewer PBS.
    fn apply_table(
        &self,
        mut acc: Acc<B::Ct>,
        g: &dyn Fn(i64) -> i64,
        nd: usize,
        span: Option<(i64, i64)>,
        ties: bool,
    ) -> Result<Vec<Val<B::Ct>>, CircuitError> {
        let digit_of = move |y: i64, k: usize| if nd == 1 { y } else { (y >> (2 * k)) & 3 };
        let offset = acc.offset;
        // Cheapest case: the whole sum fits one block.
        if let Some(v) = self.single_block(&acc) {
            let fs: Vec<_> = (0..nd)
                .map(|k| move |t: i64| digit_of(g(t + offset), k))
                .collect();
            let refs: Vec<&dyn Fn(i64) -> i64> =
                fs.iter().map(|f| f as &dyn Fn(i64) -> i64).collect();
            return Ok(self.luts(&v, &refs));
        }
        let range = acc.range as i64;
        let (from, to) = match span {
            Some((a, b)) => ((a + 1 - offset).max(1), (b - offset).min(range)),
            None => (1, range),
        };
        let changes = level_changes(g, offset, from, to);
        let Some(&first) = changes.first() else {
            let y = g(offset);
            return Ok((0..nd).map(|k| self.constant(digit_of(y, k))).collect());
        };
        let m = common_residue_digits(&changes, digits_for(range as u64));
        if let Some(tie) = TieFit::find(g, offset, (from, to), range, &changes, m)
            .filter(|t| ties && ties_pay(&acc, g, nd, t, (from, to), span))
        {
            return self.table_with_ties(acc, g, nd, tie, (from, to));
        }
        let q = 1i64 << (2 * m);
        let mut sh = (q - first.rem_euclid(q)) % q;
        let fit = BlockFit::find(g, nd, &changes, m, sh, range, offset);
        let (window, two_blocks) = (fit.window, fit.two_blocks);
        if let Some((s2, _, _)) = window {
            sh += s2 * q;
        }
        if let Some((s2, _)) = two_blocks {
            sh += s2 * q;
        }
        for j in 0..digits_for(sh as u64) {
            let d = (sh >> (2 * j)) & 3;
            if d > 0 {
                acc.push(j, self.constant(d));
            }
        }
        let top = range + sh;
        let digits = self.normalize_from(acc, m);
        let du = &digits.d[m.min(digits.d.len() - 1)..];
        // g on U = floor(T'/4^m), T' = T + sh: constant within each block of 4^m
        let gu = move |u: i64| g((u * q).clamp(sh, top) - sh + offset);
        let range_u = top >> (2 * m);
        if let (Some((_, base, ident)), true) = (window, du.len() >= 2) {
            return Ok(self.table_in_block(du, base, ident, nd, &|u| gu(u)));
        }
        if let Some((_, base)) = two_blocks {
            return Ok(self.table_in_two_blocks(du, base));
        }
        if du.len() == 1 {
            let fs: Vec<_> = (0..nd).map(|k| move |u: i64| digit_of(gu(u), k)).collect();
            let refs: Vec<&dyn Fn(i64) -> i64> =
                fs.iter().map(|f| f as &dyn Fn(i64) -> i64).collect();
            return Ok(self.luts(&du[0], &refs));
        }
        let (ufrom, uto) = if m == 0 { (from, to) } else { (1, range_u) };
        (0..nd)
            .map(|k| self.table_on_digits(du, range_u, &|u| digit_of(gu(u), k), ufrom, uto))
            .collect()
    }

    /// A quantizer on a power-of-two step `s` whose ties (ONNX rounds half to even) put
    /// every other level change one unit late (see [`TieFit`]): on `V = T + sh`, the
    /// level is `F(floor(V / s) − [V mod 2s = s])`. The correction is one comparison of
    /// the digits below the step with zero, read into the step's digit (no borrow: that
    /// digit is odd, or 2, where the correction applies); the corrected `V` is then an
    /// accumulator on which `F` changes on multiples of `s`, a read of digits.
    fn table_with_ties(
        &self,
        mut acc: Acc<B::Ct>,
        g: &dyn Fn(i64) -> i64,
        nd: usize,
        tie: TieFit,
        (from, to): (i64, i64),
    ) -> Result<Vec<Val<B::Ct>>, CircuitError> {
        let (offset, range, sh, s) = (acc.offset, acc.range as i64, tie.sh, tie.step);
        for j in 0..digits_for(sh as u64) {
            let d = (sh >> (2 * j)) & 3;
            if d > 0 {
                acc.push(j, self.constant(d));
            }
        }
        let mut d = self.normalize_from(acc, 0).d;
        // the step's digit: s = 4^m (correct odd digits by 1) or 2·4^m (correct a 2 by 2)
        let m = (s.trailing_zeros() / 2) as usize;
        let odd = s.trailing_zeros() % 2 == 0;
        if d.len() > m {
            let fix = move |x: i64, low_zero: bool| match (low_zero, odd) {
                (true, true) if x % 2 == 1 => x - 1,
                (true, false) if x == 2 => 0,
                _ => x,
            };
            // 1 when the digits below m are all zero
            let mut zero: Option<Val<B::Ct>> = None;
            for dj in &d[..m] {
                zero = Some(match zero {
                    None => self.lut(dj, |v| (v == 0) as i64),
                    Some(z) => self.lut(&self.pack(&self.quiet(&z), dj), |v| {
                        (v >> 2 == 1 && v & 3 == 0) as i64
                    }),
                });
            }
            // the fresh flag is the high operand: the digit needs no refresh
            d[m] = match zero {
                None => self.lut(&d[m], |v| fix(v, true)),
                Some(z) => self.lut(&self.pack(&z, &d[m]), |v| fix(v & 3, v >> 2 == 1)),
            };
        }
        let mut fixed = Acc::zero();
        for (j, dj) in d.into_iter().enumerate() {
            fixed.push(j, Val { lo: 0, ..dj });
        }
        fixed.range = fixed.range.min((range + sh) as u64);
        // F on the corrected V: g at a value of T with the same floor(V / s) that is no tie
        let f = move |v: i64| g((v.div_euclid(s) * s + 1 - sh).clamp(0, range) + offset);
        let span = (from - 1 + sh - 2 * s, to + sh + 2 * s);
        self.apply_table(fixed, &f, nd, Some(span), false)
    }

    /// `g(U)` for `U = Σ 4^j d[j]` (≥ 2 digits) when g is constant below the block of 16
    /// starting at `base` (a multiple of 16) and constant above it. The digits above the
    /// two lowest say where U lies (below / in / above the block: a lexicographic
    /// comparison, one PBS per digit); each output digit is then one bivariate PBS of that
    /// state and the table of the two low digits (itself one PBS, or none when g is the
    /// identity on the block, `ident`).
    fn table_in_block(
        &self,
        d: &[Val<B::Ct>],
        base: i64,
        ident: bool,
        nd: usize,
        g: &dyn Fn(i64) -> i64,
    ) -> Vec<Val<B::Ct>> {
        let digit_of = |y: i64, k: usize| if nd == 1 { y } else { (y >> (2 * k)) & 3 };
        let inner = |k: usize| -> Val<B::Ct> {
            if ident {
                d[k].clone()
            } else {
                let p = self.pack(&self.quiet(&d[1]), &d[0]);
                self.lut(&p, |v| digit_of(g(base + v), k))
            }
        };
        if d.len() == 2 {
            debug_assert_eq!(base, 0);
            return (0..nd).map(inner).collect();
        }
        let state = self.compare_const(&d[2..], base >> 4);
        let (lo, hi) = (g(base - 1), g(base + 16));
        (0..nd)
            .map(|k| {
                let z = inner(k);
                let p = self.pack(&state, &z);
                let (l, h) = (digit_of(lo, k), digit_of(hi, k));
                // clamped to z's bounds: packing makes unreachable low parts look possible
                let (zl, zh) = (z.lo, z.hi);
                self.lut(&p, |v| match v >> 2 {
                    0 => l,
                    1 => (v & 3).clamp(zl, zh),
                    _ => h,
                })
            })
            .collect()
    }

    /// The two base-4 digits of `clamp(U − base, 0, 31) / 2` for `U = Σ 4^j d[j]` (≥ 3
    /// digits) and `base` a multiple of 16: a 16-level quantizer on a step of two units of U.
    /// The digits above the lowest two place U below, in block `base/16`, in the next block
    /// or above (one PBS per digit); then three bivariate PBS give the level's digits.
    fn table_in_two_blocks(&self, d: &[Val<B::Ct>], base: i64) -> Vec<Val<B::Ct>> {
        let state = self.compare_const_2(&d[2..], base >> 4);
        // level = 8·block + 2·d1 + d0/2: digit 0 is 2·(d1 mod 2) + d0/2, digit 1 is
        // 2·block + d1/2
        let z0 = self.lut(&self.pack(&self.quiet(&d[1]), &d[0]), |v| {
            2 * ((v >> 2) & 1) + ((v & 3) >> 1)
        });
        let y0 = self.lut(&self.pack(&state, &z0), |v| match v >> 2 {
            0 => 0,
            3 => 3,
            _ => v & 3,
        });
        let h1 = d[1].hi;
        let y1 = self.lut(&self.pack(&state, &d[1]), |v| match v >> 2 {
            0 => 0,
            s @ (1 | 2) => 2 * (s - 1) + ((v & 3).min(h1) >> 1),
            _ => 3,
        });
        vec![y0, y1]
    }

    /// 0, 1, 2 or 3 as `V = Σ 4^j d[j]` is below `k`, equal to it, equal to `k + 1`, or
    /// above: the difference V − k clamped to −1..=2, refined from the top digit (one PBS
    /// per digit; a difference of 0 or 1 is exact, the ends saturate).
    fn compare_const_2(&self, d: &[Val<B::Ct>], k: i64) -> Val<B::Ct> {
        let top = d.len() - 1;
        let kd = |j: usize| const_digit(k, j, top);
        let kt = kd(top);
        let mut r = self.lut(&d[top], |v| (v - kt).clamp(-1, 2) + 1);
        for j in (0..top).rev() {
            let kj = kd(j);
            r = self.lut(&self.pack(&r, &d[j]), |v| {
                let (s, x) = (v >> 2, v & 3);
                match s {
                    0 => 0,
                    3 => 3,
                    _ => (4 * (s - 1) + x - kj).clamp(-1, 2) + 1,
                }
            });
        }
        r
    }

    /// 0, 1 or 2 as `Σ 4^j d[j]` is below, equal to or above the clear `k` (one PBS per
    /// digit, from the top).
    fn compare_const(&self, d: &[Val<B::Ct>], k: i64) -> Val<B::Ct> {
        let top = d.len() - 1;
        let kd = |j: usize| const_digit(k, j, top);
        let kt = kd(top);
        let mut r = self.lut(&d[top], |v| (v.cmp(&kt) as i64) + 1);
        for j in (0..top).rev() {
            r = self.refine(&r, &d[j], kd(j));
        }
        r
    }

    /// One step of a lexicographic comparison from the top digit: the state so far (0, 1,
    /// 2 for lt, eq, gt) refined by the next digit `x` against the clear digit `t`.
    fn refine(&self, state: &Val<B::Ct>, x: &Val<B::Ct>, t: i64) -> Val<B::Ct> {
        let p = self.pack(state, x);
        self.lut(&p, |v| {
            let (s, x) = (v >> 2, v & 3);
            if s == 1 {
                (x.cmp(&t) as i64) + 1
            } else {
                s
            }
        })
    }

    /// `gt(T)` for a normalized accumulator `T = Σ 4^j d[j]` in `0..=range` (≥ 2 digits);
    /// `gt` may only change on `from..=to`.
    fn table_on_digits(
        &self,
        d: &[Val<B::Ct>],
        range: i64,
        gt: &dyn Fn(i64) -> i64,
        from: i64,
        to: i64,
    ) -> Result<Val<B::Ct>, CircuitError> {
        let base = gt(from - 1);
        let (mut ylo, mut yhi) = (base, base);
        let mut steps = Vec::new();
        let mut prev = base;
        for t in from..=to.min(range) {
            let cur = gt(t);
            ylo = ylo.min(cur);
            yhi = yhi.max(cur);
            if cur != prev {
                steps.push((t, cur - prev));
                prev = cur;
            }
        }
        if steps.is_empty() {
            return Ok(self.constant(base));
        }
        let hs = self.steps(d, &steps);
        let mut y = self.constant(base);
        if hs.len() <= 9 {
            for h in &hs {
                y = self.add(y, h);
            }
        } else {
            // Too many steps to sum within the next layer's noise budget: clean them in
            // groups whose partial sums fit one block.
            let mut groups: Vec<Vec<&Val<B::Ct>>> = vec![vec![]];
            let mut width = 0;
            for h in &hs {
                let w = h.hi.max(-h.lo).max(1);
                if width + w > 15 || groups.last().unwrap().len() == 25 {
                    groups.push(vec![]);
                    width = 0;
                }
                width += w;
                groups.last_mut().unwrap().push(h);
            }
            if groups.len() > 9 {
                return Err(CircuitError::TableTooIrregular(steps.len()));
            }
            for g in groups {
                let neg: i64 = g.iter().map(|h| (-h.lo).max(0)).sum();
                let mut p = self.constant(neg);
                for h in g {
                    p = self.add(p, h);
                }
                let p = Val { lo: 0, ..p };
                let c = self.lut(&p, |v| v - neg);
                y = self.add(y, &c);
            }
        }
        Ok(Val {
            lo: ylo,
            hi: yhi,
            ..y
        })
    }

    /// The accumulator as one block, when it fits without any carry.
    fn single_block(&self, acc: &Acc<B::Ct>) -> Option<Val<B::Ct>> {
        if acc.range >= BLOCK || acc.cols.iter().skip(1).any(|c| !c.is_empty()) {
            return None;
        }
        let col = acc.cols.first()?;
        if col.iter().map(|v| v.var).sum::<u64>() > NOISE_BUDGET {
            return None;
        }
        let mut it = col.iter();
        let mut s = it.next()?.clone();
        for v in it {
            s = self.add(s, v);
        }
        Some(Val {
            lo: 0,
            hi: acc.range as i64,
            ..s
        })
    }

    /// For each step (θ, δ): a PBS output equal to δ when T ≥ θ, else 0.
    /// Lexicographic comparison from the top digit: the top digit is compared with all
    /// thresholds at once (many-LUT), then each lower digit refines the state
    /// lt/eq/gt with one bivariate PBS per threshold.
    fn steps(&self, d: &[Val<B::Ct>], steps: &[(i64, i64)]) -> Vec<Val<B::Ct>> {
        let top = d.len() - 1;
        let dig = |t: i64, j: usize| (t >> (2 * j)) & 3;
        // The state after digits top..=j depends only on the threshold's digits there:
        // thresholds sharing a prefix share its comparisons.
        let mut tops: Vec<i64> = steps.iter().map(|&(t, _)| t >> (2 * top)).collect();
        tops.sort_unstable();
        tops.dedup();
        let cmps: Vec<Box<dyn Fn(i64) -> i64>> = tops
            .iter()
            .map(|&tt| Box::new(move |v: i64| (v.cmp(&tt) as i64) + 1) as Box<dyn Fn(i64) -> i64>)
            .collect();
        let refs: Vec<&dyn Fn(i64) -> i64> = cmps.iter().map(|b| b.as_ref()).collect();
        let mut memo: std::collections::HashMap<(usize, i64), Val<B::Ct>> = tops
            .iter()
            .zip(self.luts(&d[top], &refs))
            .map(|(&tt, r)| ((top, tt), r))
            .collect();
        steps
            .iter()
            .map(|&(t, delta)| {
                let mut r = memo[&(top, t >> (2 * top))].clone();
                for j in (1..top).rev() {
                    let key = (j, t >> (2 * j));
                    if let Some(v) = memo.get(&key) {
                        r = v.clone();
                        continue;
                    }
                    r = self.refine(&r, &d[j], dig(t, j));
                    memo.insert(key, r.clone());
                }
                let t0 = dig(t, 0);
                let p = self.pack(&r, &d[0]);
                self.lut(&p, |v| {
                    let (s, x) = (v >> 2, v & 3);
                    if s == 2 || (s == 1 && x >= t0) {
                        delta
                    } else {
                        0
                    }
                })
            })
            .collect()
    }
}

impl<B: Backend> Engine<B> {
    /// `v` with variance 1 when it is noisier (one PBS), so it can be the high operand of a
    /// bivariate table.
    fn quiet(&self, v: &Val<B::Ct>) -> Val<B::Ct> {
        if v.var <= 1 {
            v.clone()
        } else {
            self.refresh(v)
        }
    }

    /// 1 when `b > a` (as base-4 digit strings of the same length), else 0.
    pub fn greater(&self, a: &[Val<B::Ct>], b: &[Val<B::Ct>]) -> Val<B::Ct> {
        let top = a.len() - 1;
        let cmp = |j: usize| {
            let p = self.pack(&self.quiet(&b[j]), &a[j]);
            (p, |v: i64| ((v >> 2).cmp(&(v & 3)) as i64) + 1)
        };
        if top == 0 {
            let (p, _) = cmp(0);
            return self.lut(&p, |v| ((v >> 2) > (v & 3)) as i64);
        }
        let (p, f) = cmp(top);
        let mut r = self.lut(&p, f);
        for j in (0..top).rev() {
            let (p, f) = cmp(j);
            let c = self.lut(&p, f);
            let q = self.pack(&r, &c);
            r = if j == 0 {
                self.lut(&q, |v| {
                    let (s, c) = (v >> 2, v & 3);
                    (s == 2 || (s == 1 && c == 2)) as i64
                })
            } else {
                self.lut(&q, |v| if v >> 2 == 1 { v & 3 } else { v >> 2 })
            };
        }
        r
    }

    /// `bit ? b : a` digit by digit (two PBS per digit, none when both are constants).
    pub fn select(&self, bit: &Val<B::Ct>, a: &[Val<B::Ct>], b: &[Val<B::Ct>]) -> Vec<Val<B::Ct>> {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                if x.var == 0 && y.var == 0 {
                    // constants: x + bit·(y − x) is exact and leveled
                    let d = y.lo - x.lo;
                    let scaled = if d >= 0 {
                        self.scale(bit.clone(), d as u64)
                    } else {
                        let mut z = self.constant(0);
                        let sb = self.scale(bit.clone(), (-d) as u64);
                        self.backend.sub_assign(&mut z.ct, &sb.ct);
                        Val {
                            lo: d,
                            hi: 0,
                            var: sb.var,
                            ct: z.ct,
                        }
                    };
                    let r = self.add_const(scaled, x.lo);
                    Val {
                        lo: x.lo.min(y.lo),
                        hi: x.hi.max(y.hi),
                        ..r
                    }
                } else {
                    let pa = self.pack(bit, x);
                    let pb = self.pack(bit, y);
                    let keep_a = self.lut(&pa, |v| if v >> 2 == 1 { 0 } else { v & 3 });
                    let keep_b = self.lut(&pb, |v| if v >> 2 == 1 { v & 3 } else { 0 });
                    let r = self.add(keep_a, &keep_b);
                    Val {
                        lo: 0,
                        hi: x.hi.max(y.hi),
                        ..r
                    }
                }
            })
            .collect()
    }
}

/// Base-4 digit `j` of the clear `k` compared with a number of `top + 1` digits: the top
/// one takes everything above it.
fn const_digit(k: i64, j: usize, top: usize) -> i64 {
    if j == top {
        k >> (2 * j)
    } else {
        (k >> (2 * j)) & 3
    }
}

/// Number of base-4 digits needed for values `0..=range`.
pub fn digits_for(range: u64) -> usize {
    let mut n = 1;
    while n < 32 && range >> (2 * n) > 0 {
        n += 1;
    }
    n
}

fn table_of<C>(a: &Val<C>, f: &dyn Fn(i64) -> i64) -> ([u64; BLOCK as usize], i64, i64) {
    let mut table = [0u64; BLOCK as usize];
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    for v in a.lo..=a.hi {
        let y = f(v);
        lo = lo.min(y);
        hi = hi.max(y);
        table[v as usize] = y.rem_euclid(32) as u64;
    }
    (table, lo, hi)
}

/// A wide non-negative sum `T = Σ_j 4^j Σ cols[j]` with `T ∈ 0..=range`; the integer it
/// stands for is `S = T + offset`.
#[derive(Clone, Debug)]
pub struct Acc<C> {
    pub cols: Vec<Vec<Val<C>>>,
    pub offset: i64,
    pub range: u64,
}

impl<C: Clone> Acc<C> {
    pub fn zero() -> Self {
        Acc {
            cols: vec![vec![]],
            offset: 0,
            range: 0,
        }
    }

    /// Adds a non-negative value at column `j` (weight 4^j).
    pub fn push(&mut self, j: usize, v: Val<C>) {
        assert!(v.lo >= 0, "accumulator terms are non-negative");
        if self.cols.len() <= j {
            self.cols.resize_with(j + 1, Vec::new);
        }
        self.range += (v.hi as u64) << (2 * j);
        self.cols[j].push(v);
    }

    /// Adds a value that may be negative by shifting it (and the offset) by its lower bound.
    pub fn push_signed<B: Backend<Ct = C>>(&mut self, e: &Engine<B>, v: Val<C>) {
        let lo = v.lo;
        let v = e.add_const(v, -lo);
        self.offset += lo;
        self.push(0, Val { lo: 0, ..v });
    }

    /// `m·self` without any PBS: each term is repeated per base-4 digit of `m`, shifted
    /// to that digit's column (noise per term is unchanged).
    pub fn times(self, m: u64) -> Self {
        if m == 1 {
            return self;
        }
        let mut out = Acc::zero();
        for (j, col) in self.cols.into_iter().enumerate() {
            for v in col {
                let mut p = 0;
                let mut r = m;
                while r > 0 {
                    for _ in 0..(r & 3) {
                        out.push(j + p, v.clone());
                    }
                    r >>= 2;
                    p += 1;
                }
            }
        }
        out.offset = self.offset * m as i64;
        out.range = out.range.min(self.range * m);
        out
    }

    pub fn merge(mut self, other: Acc<C>) -> Self {
        if self.cols.len() < other.cols.len() {
            self.cols.resize_with(other.cols.len(), Vec::new);
        }
        for (j, c) in other.cols.into_iter().enumerate() {
            self.cols[j].extend(c);
        }
        self.offset += other.offset;
        self.range += other.range;
        self
    }
}

/// Normalized accumulator: `S = offset + Σ 4^j d[j]`, each digit in 0..=3.
#[derive(Clone, Debug)]
pub struct Digits<C> {
    pub d: Vec<Val<C>>,
    pub offset: i64,
    pub range: u64,
}

/// The level changes of `g` at `t + offset` for `t` in `from..=to` (where `g(t) != g(t-1)`).
fn level_changes(g: &dyn Fn(i64) -> i64, offset: i64, from: i64, to: i64) -> Vec<i64> {
    let mut changes = Vec::new();
    if from <= to {
        let mut prev = g(from - 1 + offset);
        for t in from..=to {
            let cur = g(t + offset);
            if cur != prev {
                changes.push(t);
                prev = cur;
            }
        }
    }
    changes
}

/// The most low base-4 digits (below `dmax`) on which every change has the same residue:
/// a comparison then reads only the digits above them.
fn common_residue_digits(changes: &[i64], dmax: usize) -> usize {
    let first = changes[0];
    let mut m = 0;
    while m + 1 < dmax {
        let q = 1i64 << (2 * (m + 1));
        if changes
            .iter()
            .all(|c| c.rem_euclid(q) == first.rem_euclid(q))
        {
            m += 1;
        } else {
            break;
        }
    }
    m
}

/// Whether correcting the ties first ([`Engine::table_with_ties`]) plans fewer PBS than
/// the general table on an accumulator shaped like `acc` (both run on nothing).
fn ties_pay<C>(
    acc: &Acc<C>,
    g: &dyn Fn(i64) -> i64,
    nd: usize,
    tie: &TieFit,
    changing: (i64, i64),
    span: Option<(i64, i64)>,
) -> bool {
    use super::backend::PlanBackend;
    let shape = || Acc {
        cols: acc
            .cols
            .iter()
            .map(|c| {
                c.iter()
                    .map(|v| Val {
                        ct: (),
                        lo: v.lo,
                        hi: v.hi,
                        var: v.var,
                    })
                    .collect()
            })
            .collect(),
        offset: acc.offset,
        range: acc.range,
    };
    let cost = |with_ties: bool| {
        let e = Engine::new(PlanBackend);
        let done = match with_ties {
            true => e.table_with_ties(shape(), g, nd, *tie, changing),
            false => e.apply_table(shape(), g, nd, span, false),
        };
        done.map(|_| e.pbs_count()).unwrap_or(u64::MAX)
    };
    cost(true) < cost(false)
}

/// A quantizer whose levels are a power of two `step` ≥ 4 apart, except that ONNX's
/// rounding half to even makes every other level start one unit later (its tie rounds
/// down): on `V = T + sh`, `g = F(floor(V / step) − [V mod 2·step = step])` for the `F`
/// that `g` takes between ties. Found only where the changes share fewer low digits than
/// the step has (else the common residue already reads digits), and checked on every
/// value where `g` may change.
#[derive(Clone, Copy)]
struct TieFit {
    step: i64,
    sh: i64,
}

impl TieFit {
    fn find(
        g: &dyn Fn(i64) -> i64,
        offset: i64,
        (from, to): (i64, i64),
        range: i64,
        changes: &[i64],
        m: usize,
    ) -> Option<Self> {
        let (first, last) = (*changes.first()?, *changes.last()?);
        if changes.len() < 2 {
            return None;
        }
        let n = changes.len() as i64 - 1;
        let step = ((last - first) + n / 2) / n;
        let k = step.trailing_zeros() as usize;
        if step < 4 || step.count_ones() != 1 || k / 2 <= m {
            return None;
        }
        let near = changes.windows(2).all(|w| (w[1] - w[0] - step).abs() <= 1);
        if !near {
            return None;
        }
        let two = 2 * step;
        [(-first).rem_euclid(two), (step + 1 - first).rem_euclid(two)]
            .into_iter()
            .find(|&sh| {
                let f = |u: i64| g((u * step + 1 - sh).clamp(0, range) + offset);
                let lo = (from - 1 - two).max(0);
                let hi = (to + two).min(range);
                (lo..=hi).all(|t| {
                    let v = t + sh;
                    let tie = (v.rem_euclid(two) == step) as i64;
                    g(t + offset) == f(v.div_euclid(step) - tie)
                })
            })
            .map(|sh| TieFit { step, sh })
    }
}

/// Where the changes of a table fit blocks of 16 values of `U = floor(T'/4^m)`, if they do:
/// the extra shift (in units of U) and the block's start.
struct BlockFit {
    /// All changes inside one block: (shift, block start, g is the identity on it).
    window: Option<(i64, i64, bool)>,
    /// A 16-level quantizer on a step of 2·4^m over two blocks: (shift, first block start).
    two_blocks: Option<(i64, i64)>,
}

impl BlockFit {
    fn find(
        g: &dyn Fn(i64) -> i64,
        nd: usize,
        changes: &[i64],
        m: usize,
        sh: i64,
        range: i64,
        offset: i64,
    ) -> Self {
        let (q, first) = (1i64 << (2 * m), changes[0]);
        // In units of U = floor(T'/4^m), g changes only on U_a..=U_b. When the window
        // U_a - 1..=U_b is at most 16 values, a further shift puts it inside one block of
        // 16 (two digits of U), so the higher digits only say below / in / above the block.
        let last = *changes.last().unwrap();
        let (ua, ub) = ((first + sh) / q, (last + sh) / q);
        let len = ub - ua + 2;
        // the extra shift (in units of U) that puts the window's start at offset `o` of a
        // block, and that block's start (in units of U, after the shift)
        let at = |o: i64| {
            let s2 = (o - (ua - 1)).rem_euclid(16);
            (s2, (ua - 1 + s2) - o)
        };
        // g at U = base + v once shifted by s2
        let g_at = |s2: i64, u: i64| g((u * q - s2 * q - sh).clamp(0, range) + offset);
        let window = (len <= 16).then(|| {
            // the block offset at which g on the block is the identity, if any: then the
            // output digits are U's own two low digits
            let ident = (nd == 2)
                .then(|| {
                    (0..=16 - len).find(|&o| {
                        let (s2, base) = at(o);
                        (0..16).all(|v| g_at(s2, base + v) == v)
                    })
                })
                .flatten();
            // otherwise the offset that needs the least extra shift
            let fit = (ua - 1).rem_euclid(16);
            let o = ident.unwrap_or(if fit <= 16 - len { fit } else { 0 });
            let (s2, base) = at(o);
            (s2, base, ident.is_some())
        });
        // A 16-level quantizer on a step of 2·4^m spans two blocks: positions i = 0..32 of
        // blocks k, k+1 give level i/2 when aligned so (see `table_in_two_blocks`).
        let two_blocks = (window.is_none() && nd == 2 && len <= 32)
            .then(|| {
                (0..=32 - len).find_map(|o| {
                    let (s2, base) = at(o % 16);
                    let base = base - 16 * (o / 16);
                    let fits = base >= 0
                        && digits_for(((range + sh + s2 * q) >> (2 * m)) as u64) >= 3
                        && (0..32).all(|i| g_at(s2, base + i) == i >> 1);
                    fits.then_some((s2, base))
                })
            })
            .flatten();
        BlockFit { window, two_blocks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhe::backend::ClearBackend;

    /// Runs `g` on every value of a 4-digit accumulator (`T = Σ 4^j d_j`, offset `off`) and
    /// returns the most PBS one evaluation spent.
    fn exhaustive(g: &dyn Fn(i64) -> i64, nd: usize, off: i64) -> u64 {
        let mut most = 0;
        for t in 0..256i64 {
            let e = Engine::new(ClearBackend);
            let mut acc = Acc::zero();
            for j in 0..4 {
                acc.push(j, e.fresh(((t >> (2 * j)) & 3) as u64, 0, 3));
            }
            acc.offset = off;
            let out = e.apply_table_digits(acc, g, nd, None).unwrap();
            let got: i64 = out
                .iter()
                .enumerate()
                .map(|(k, v)| (v.ct as i64) << (2 * k))
                .sum();
            assert_eq!(got, g(t + off), "T = {t}");
            most = most.max(e.pbs_count());
        }
        most
    }

    #[test]
    fn a_power_of_four_quantizer_reads_two_digits_and_compares_the_rest() {
        // 16 levels on steps of 4: T is shifted by 11 so the levels are digits 1 and 2 of
        // T + 11 (carrying the shift: 4 PBS), digits 3 and 4 say below / in / above (2),
        // and each output digit is one selection (2)
        let q = |s: i64| ((s - 37).div_euclid(4) + 1).clamp(0, 15);
        assert_eq!(exhaustive(&q, 2, -20), 4 + 2 + 2);
    }

    #[test]
    fn a_quantizer_on_an_odd_power_of_two_step_spans_two_blocks() {
        // 16 levels on steps of 2: T is shifted by 5 so the levels are positions 0..32 of
        // two blocks of U = T + 5 (carrying the shift: 4 PBS, and U gets a fifth digit);
        // digits 2..=4 place U (3 PBS), three more give the level's digits
        let q = |s: i64| ((s - 41).div_euclid(2) + 1).clamp(0, 15);
        assert_eq!(exhaustive(&q, 2, -20), 4 + 3 + 3);
        // steps of 8 (2·4): the same on U = (T + shift) / 4
        let q8 = |s: i64| ((s - 13).div_euclid(8) + 1).clamp(0, 15);
        exhaustive(&q8, 2, 0);
    }

    #[test]
    fn a_table_changing_within_sixteen_values_is_one_block() {
        let g = |s: i64| match s {
            ..=99 => 0,
            100..=102 => 2,
            103 => 1,
            _ => 3,
        };
        // compare the two high digits, table the two low ones, select
        assert_eq!(exhaustive(&g, 1, 0), 2 + 2);
    }

    /// ONNX's QuantizeLinear of `x = t / step` (ties to even), clamped to `0..=top`.
    fn onnx_levels(step: i64, shift: i64, top: i64) -> impl Fn(i64) -> i64 {
        move |t: i64| {
            let x = (t - shift) as f64 / step as f64;
            (x.round_ties_even() as i64).clamp(0, top)
        }
    }

    #[test]
    fn ties_to_even_on_a_power_of_two_step_are_a_digit_read_and_one_comparison() {
        for (step, nd, top) in [(4, 1, 3), (8, 1, 3), (16, 1, 3), (4, 2, 15), (16, 2, 7)] {
            for shift in [0, 5, 24, 37] {
                for off in [-20, 0] {
                    let q = onnx_levels(step, shift, top);
                    // all ties taken exactly (exhaustive checks every T), and on a 4-digit
                    // accumulator at most 13 PBS: the comparisons of the general table
                    // took 41–48 for 16 levels on a step of 4, 26 for 8 on a step of 16
                    let pbs = exhaustive(&q, nd, off);
                    assert!(pbs <= 13, "step {step}, shift {shift}: {pbs} PBS");
                }
            }
        }
    }

    #[test]
    fn a_wide_table_falls_back_to_steps() {
        let g = |s: i64| [0, 3, 1][((s > 40) as usize) + ((s > 200) as usize)];
        assert!(exhaustive(&g, 1, 0) > 4);
    }
}
