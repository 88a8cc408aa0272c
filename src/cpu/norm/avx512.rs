//! The AVX-512 kernels of [`super`]: the same operations on each value in the same order as the
//! portable ones (so the same bits), a row's last `c mod 16` channels as one masked vector.

use super::{BLOCK, Cols, add_block};
use std::arch::x86_64::*;

/// [`super::mask_dot_k`] in 16-lane vectors, a row's last `c mod 16` channels masked.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn mask_dot(
    d: &[f32],
    z: &[f32],
    c: usize,
    p: Cols,
    mask: bool,
    s: &mut [f64],
    sx: &mut [f64],
) {
    let (mean, invstd, gamma, beta) = p.cut(c);
    let rows = d.len().min(z.len()) / c;
    let w = c.next_multiple_of(16);
    let (mut ps, mut psx) = (vec![0f32; w], vec![0f32; w]);
    let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
    for r0 in (0..rows).step_by(BLOCK) {
        ps.fill(0.0);
        psx.fill(0.0);
        for r in r0..(r0 + BLOCK).min(rows) {
            for j in (0..c).step_by(16) {
                let k: __mmask16 = if c - j >= 16 { !0 } else { (1 << (c - j)) - 1 };
                // SAFETY: lanes `k` are channels j.. of row r (< c), inside every slice;
                // `ps`, `psx` are `w` long.
                unsafe {
                    let ld = |v: &[f32], at: usize| _mm512_maskz_loadu_ps(k, v.as_ptr().add(at));
                    let (dv, zv) = (ld(d, r * c + j), ld(z, r * c + j));
                    let xh = _mm512_mul_ps(_mm512_sub_ps(zv, ld(mean, j)), ld(invstd, j));
                    let y = _mm512_add_ps(_mm512_mul_ps(ld(gamma, j), xh), ld(beta, j));
                    let keep = if mask {
                        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, zero)
                            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, six)
                    } else {
                        !0
                    };
                    let v = _mm512_maskz_mov_ps(keep, dv);
                    let (a, ax) = (ps.as_mut_ptr().add(j), psx.as_mut_ptr().add(j));
                    _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), v));
                    let vx = _mm512_mul_ps(v, xh);
                    _mm512_storeu_ps(ax, _mm512_add_ps(_mm512_loadu_ps(ax), vx));
                }
            }
        }
        add_block(&mut s[..c], &ps[..c]);
        add_block(&mut sx[..c], &psx[..c]);
    }
}
