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
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
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
