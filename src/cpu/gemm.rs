//! Matrix products through the `gemm` crate (its own run-time AVX-512/AVX2 dispatch), row-major:
//! the strided core and the shapes the engine and the training pass use.

use std::mem::MaybeUninit;

/// `dst[m][n] += lhs[m][k] · rhsᵀ` with `rhs` stored `[n][k]`, all row-major, single-threaded.
pub fn matmul_acc(lhs: &[f32], m: usize, k: usize, rhs: &[f32], n: usize, dst: &mut [f32]) {
    let (lrs, lcs, rrs, rcs) = (k as isize, 1, 1, k as isize);
    gemm_rm(
        dst,
        [m, n, k],
        lhs,
        [lrs, lcs],
        rhs,
        [rrs, rcs],
        true,
        false,
    );
}

/// Dense row-major `dst[m][n] (+)= lhs · rhs` (`dims` = [m, n, k]), the operands given by
/// (row, column) strides over their slices: `lhs` is m × k, `rhs` is k × n. Threaded over the
/// rayon pool when `threaded`; adds to `dst` when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rm(
    dst: &mut [f32],
    dims: [usize; 3],
    lhs: &[f32],
    lhs_strides: [isize; 2],
    rhs: &[f32],
    rhs_strides: [isize; 2],
    accumulate: bool,
    threaded: bool,
) {
    let [m, n, _] = dims;
    assert!(dst.len() >= m * n);
    // SAFETY: `dst` is an exclusively borrowed slice of at least m·n floats.
    unsafe {
        gemm_ptr(
            dst.as_mut_ptr(),
            dims,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            accumulate,
            threaded,
        )
    }
}

/// `dst[m][n] = lhs · rhs` (`dims` = [m, n, k], single-threaded) over an uninitialised destination,
/// which the product writes whole.
pub fn gemm_uninit(
    dst: &mut [MaybeUninit<f32>],
    dims: [usize; 3],
    lhs: &[f32],
    lhs_strides: [isize; 2],
    rhs: &[f32],
    rhs_strides: [isize; 2],
) {
    assert!(dst.len() >= dims[0] * dims[1]);
    // SAFETY: `dst` is an exclusively borrowed slice of at least m·n floats; a product that does not
    // accumulate writes them all and reads none.
    unsafe {
        gemm_ptr(
            dst.as_mut_ptr().cast(),
            dims,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            false,
            false,
        )
    }
}

/// [`gemm_rm`] into a raw destination.
///
/// # Safety
/// `dst` points to m·n writable floats that nothing else reads or writes meanwhile; they may be
/// uninitialised when not `accumulate` (the product then writes every one and reads none, zeros
/// when k = 0).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr(
    dst: *mut f32,
    dims: [usize; 3],
    lhs: &[f32],
    lhs_strides: [isize; 2],
    rhs: &[f32],
    rhs_strides: [isize; 2],
    accumulate: bool,
    threaded: bool,
) {
    let [m, n, k] = dims;
    // The layouts used here are dense: every operand holds exactly its product of dimensions.
    assert!(lhs.len() >= m * k && rhs.len() >= n * k);
    if m == 0 || n == 0 {
        return; // no destination element (e.g. a band whose input rows are all held already)
    }
    let [lrs, lcs] = lhs_strides;
    let [rrs, rcs] = rhs_strides;
    // Whether the last element an r × c operand's strides reach lies in its slice; an operand
    // with no element (k = 0) reaches none.
    let inside = |rs: isize, cs: isize, r: usize, c: usize, len: usize| {
        r == 0 || c == 0 || (((r - 1) as isize * rs + (c - 1) as isize * cs) as usize) < len
    };
    assert!(inside(lrs, lcs, m, k, lhs.len()) && inside(rrs, rcs, k, n, rhs.len()));
    let par = if threaded {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element the strides reach is inside its slice (checked above); the
    // destination is as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A new `[m][n]` matrix `lhs · rhs` (threaded), written by the product itself: no zero-filling
/// pass over a buffer the product overwrites anyway.
fn product(
    dims: [usize; 3],
    lhs: &[f32],
    lhs_strides: [isize; 2],
    rhs: &[f32],
    rhs_strides: [isize; 2],
) -> Vec<f32> {
    let len = dims[0] * dims[1];
    let mut out = crate::cpu::pool::take(len);
    // SAFETY: the vector's spare capacity holds `len` floats, owned here; a product that does not
    // accumulate writes all of them and reads none, so they are initialised for `set_len`.
    unsafe {
        gemm_ptr(
            out.as_mut_ptr(),
            dims,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            false,
            true,
        );
        out.set_len(len);
    }
    out
}

/// `x[rows][k] · w[n][k]ᵀ` → `[rows][n]` (a 1×1 convolution forward).
pub fn matmul_nt(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    product([rows, n, k], x, [k as isize, 1], w, [1, k as isize])
}

/// `d[rows][n] · w[n][k]` → `[rows][k]` (a 1×1 convolution's input gradient).
pub fn matmul_nn(d: &[f32], rows: usize, n: usize, w: &[f32], k: usize) -> Vec<f32> {
    product([rows, k, n], d, [n as isize, 1], w, [k as isize, 1])
}

/// Rows of each part of a split weight-gradient product ([`matmul_tn`]).
pub const TN_PART_ROWS: usize = 2048;

/// `d[rows][n]ᵀ · x[rows][k]` → `[n][k]` (a 1×1 convolution's weight gradient).
///
/// The product sums over `rows`, the batch's pixels, while its output is small (a layer's weights),
/// so the `gemm` crate's threads, which split the output, leave cores idle on the early layers. With
/// at least two parts' worth of rows, parts of [`TN_PART_ROWS`] rows run single-threaded on the
/// rayon pool and their sums are added in part order: the parts depend on the shape alone, so the
/// result is the same for any number of threads.
pub fn matmul_tn(d: &[f32], rows: usize, n: usize, x: &[f32], k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(d.len() >= rows * n && x.len() >= rows * k);
    if rows < 2 * TN_PART_ROWS {
        return product([n, k, rows], d, [1, n as isize], x, [k as isize, 1]);
    }
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(TN_PART_ROWS))
        .into_par_iter()
        .map(|i| {
            let r0 = i * TN_PART_ROWS;
            let r = TN_PART_ROWS.min(rows - r0);
            let mut out = vec![0f32; n * k];
            gemm_rm(
                &mut out,
                [n, k, r],
                &d[r0 * n..(r0 + r) * n],
                [1, n as isize],
                &x[r0 * k..(r0 + r) * k],
                [k as isize, 1],
                false,
                false,
            );
            out
        })
        .collect();
    add_in_order(parts)
}

/// The element-wise sum of equally long parts (at least one), added in their order: partial sums
/// of a split product come out the same on any number of threads.
pub fn add_in_order(parts: impl IntoIterator<Item = Vec<f32>>) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().expect("at least one part");
    for p in parts {
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty products: no pixel (m = 0) leaves the destination alone, k = 0 writes zeros or adds
    /// nothing. The engine's portable path asks for m = 0 when a band's input rows are all held.
    #[test]
    fn empty_products_are_no_ops() {
        let (k, n) = (24, 5);
        let rhs: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let mut dst = vec![7.0f32; 3];
        matmul_acc(&[], 0, k, &rhs, n, &mut dst);
        assert_eq!(dst, [7.0; 3]);
        let mut dst = vec![7.0f32; 2 * n];
        matmul_acc(&[], 2, 0, &[], n, &mut dst);
        assert_eq!(dst, vec![7.0; 2 * n]);
        gemm_rm(
            &mut dst,
            [2, n, 0],
            &[],
            [0, 1],
            &[],
            [n as isize, 1],
            false,
            false,
        );
        assert_eq!(dst, vec![0.0; 2 * n]);
    }

    /// The weight-gradient product split in parts of rows (a partial last one) equals an f64 sum.
    #[test]
    fn split_weight_gradient_matches_f64() {
        let (rows, n, k) = (2 * TN_PART_ROWS + 5, 7, 3);
        let val = |i: usize, s: usize| ((i * s + 11) % 17) as f32 / 8.0 - 1.0;
        let d: Vec<f32> = (0..rows * n).map(|i| val(i, 5)).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| val(i, 3)).collect();
        let got = matmul_tn(&d, rows, n, &x, k);
        for j in 0..n {
            for c in 0..k {
                let want: f64 = (0..rows)
                    .map(|r| d[r * n + j] as f64 * x[r * k + c] as f64)
                    .sum();
                let g = got[j * k + c] as f64;
                assert!((g - want).abs() < 1e-3, "[{j}][{c}]: {g} vs {want}");
            }
        }
    }
}
