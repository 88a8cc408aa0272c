//! The one run-time dispatch of the hand-written kernels: each is compiled for AVX-512, AVX2 + FMA
//! and the baseline, and the widest the CPU has is picked at run time.

/// `acc + x·w`, fused when the caller is compiled with FMA.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(acc: f32, x: f32, w: f32) -> f32 {
    if FMA { x.mul_add(w, acc) } else { acc + x * w }
}

/// Compiles `$kernel` (an `#[inline(always)]` function) three times, for AVX-512, AVX2 + FMA and
/// the baseline, and picks one at run time. Written `$kernel::<FMA>(…)`, the kernel takes a
/// `const FMA: bool`: true in the AVX builds (fused multiply-add, see [`madd`]), false in the
/// baseline.
macro_rules! multiversion {
    (@emit [$($attr:meta),*] $vis:vis $name:ident, [$($fast:tt)*], [$($base:tt)*], $($arg:ident: $ty:ty),*) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    $($fast)*($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    $($fast)*($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::cpu::simd::has_avx2_fma() {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $($base)*($($arg),*)
        }
    };
    ($(#[$attr:meta])* $vis:vis fn $name:ident => $kernel:ident::<FMA>($($arg:ident: $ty:ty),*)) => {
        $crate::cpu::simd::multiversion!(@emit [$($attr),*] $vis $name, [$kernel::<true>], [$kernel::<false>], $($arg: $ty),*);
    };
    ($(#[$attr:meta])* $vis:vis fn $name:ident => $kernel:ident($($arg:ident: $ty:ty),*)) => {
        $crate::cpu::simd::multiversion!(@emit [$($attr),*] $vis $name, [$kernel], [$kernel], $($arg: $ty),*);
    };
}
pub(crate) use multiversion;

/// Whether the CPU has AVX2 and FMA: the second tier of every hand-written kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// A vector of f32 lanes, what the kernels written once for AVX-512 and AVX2 (the depthwise
/// forward) need of it. Every method is `#[inline(always)]` and unsafe: callable only inside a
/// function compiled for the vector's instructions (`#[target_feature]`), into which it inlines.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Simd: Copy {
    /// f32 lanes per vector.
    const LANES: usize;
    /// Loads `LANES` floats from `p` (any alignment).
    unsafe fn load(p: *const f32) -> Self;
    /// Stores the lanes to `p` (any alignment).
    unsafe fn store(self, p: *mut f32);
    /// Every lane `v`.
    unsafe fn splat(v: f32) -> Self;
    /// `a·b + c`, fused.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// Lane-wise minimum, `b` when either is NaN.
    unsafe fn min(a: Self, b: Self) -> Self;
    /// Lane-wise maximum, `b` when either is NaN.
    unsafe fn max(a: Self, b: Self) -> Self;
}

/// Defines a [`Simd`] vector type over an `std::arch` one and its intrinsics.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_type {
    ($(#[$doc:meta])* $name:ident($raw:ident, $lanes:expr): $load:ident, $store:ident, $splat:ident,
     $fmadd:ident, $min:ident, $max:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        pub(crate) struct $name(std::arch::x86_64::$raw);

        impl Simd for $name {
            const LANES: usize = $lanes;
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                // SAFETY: the caller's (see the trait).
                Self(unsafe { std::arch::x86_64::$load(p) })
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                // SAFETY: the caller's (see the trait).
                unsafe { std::arch::x86_64::$store(p, self.0) }
            }
            #[inline(always)]
            unsafe fn splat(v: f32) -> Self {
                // SAFETY: the caller's (see the trait).
                Self(unsafe { std::arch::x86_64::$splat(v) })
            }
            #[inline(always)]
            unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
                // SAFETY: the caller's (see the trait).
                Self(unsafe { std::arch::x86_64::$fmadd(a.0, b.0, c.0) })
            }
            #[inline(always)]
            unsafe fn min(a: Self, b: Self) -> Self {
                // SAFETY: the caller's (see the trait).
                Self(unsafe { std::arch::x86_64::$min(a.0, b.0) })
            }
            #[inline(always)]
            unsafe fn max(a: Self, b: Self) -> Self {
                // SAFETY: the caller's (see the trait).
                Self(unsafe { std::arch::x86_64::$max(a.0, b.0) })
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_type!(
    /// 16 lanes: AVX-512F.
    F32x16(__m512, 16): _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
    _mm512_min_ps, _mm512_max_ps
);
#[cfg(target_arch = "x86_64")]
simd_type!(
    /// 8 lanes: AVX2 + FMA.
    F32x8(__m256, 8): _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
    _mm256_min_ps, _mm256_max_ps
);

/// Lane-wise `a < b` as a bit mask (bit `i` for lane `i`), for the kernels that branch on rare
/// lanes (exact search's top-k test).
#[cfg(target_arch = "x86_64")]
pub(crate) trait LessMask: Simd {
    /// Bit `i` set where `a[i] < b[i]` (false where either is NaN).
    unsafe fn lt_mask(a: Self, b: Self) -> u32;
}

#[cfg(target_arch = "x86_64")]
impl LessMask for F32x16 {
    #[inline(always)]
    unsafe fn lt_mask(a: Self, b: Self) -> u32 {
        use std::arch::x86_64::{_CMP_LT_OQ, _mm512_cmp_ps_mask};
        // SAFETY: the caller's (see the trait).
        unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a.0, b.0) as u32 }
    }
}

#[cfg(target_arch = "x86_64")]
impl LessMask for F32x8 {
    #[inline(always)]
    unsafe fn lt_mask(a: Self, b: Self) -> u32 {
        use std::arch::x86_64::{_CMP_LT_OQ, _mm256_cmp_ps, _mm256_movemask_ps};
        // SAFETY: the caller's (see the trait).
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(a.0, b.0)) as u32 }
    }
}
