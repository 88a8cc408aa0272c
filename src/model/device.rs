//! Where deeprank computes: the process's burn device (the CPU unless `--device` chose a GPU) and
//! rayon's thread pool, and the one way tensors come back to the host.

use anyhow::{Context, Result, anyhow, bail};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;

/// Sizes rayon's global pool (`--threads`); without it, rayon uses every core.
pub fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("cannot set up the thread pool")
}

static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Selects the compute device for this process: `cpu` (burn's flex backend, always there),
/// `vulkan` (GPU through wgpu; build with `--features gpu`) or `cuda` (`--features cuda`, which
/// needs burn's LLVM bundle at build time).
pub fn set_device(name: &str) -> Result<()> {
    let dev = match name {
        "cpu" => Device::flex(),
        "vulkan" | "gpu" => gpu_device()?,
        "cuda" => cuda_device()?,
        other => bail!("unknown --device {other:?}: use cpu, vulkan or cuda"),
    };
    if DEVICE.set(dev).is_err() {
        bail!("the compute device is already set");
    }
    Ok(())
}

/// burn's Vulkan device, initialised now so that a machine without one gets an error here rather
/// than a panic at the first tensor.
#[cfg(feature = "gpu")]
fn gpu_device() -> Result<Device> {
    use burn::tensor::wgpu::WgpuBackend;
    Device::wgpu_options()
        .graphics_api(WgpuBackend::Vulkan)
        .init()
        .map_err(|e| {
            anyhow!(
                "--device vulkan: no usable Vulkan device ({e}); install the GPU's Vulkan driver, \
                 or Mesa's software one (apt-get install mesa-vulkan-drivers), or use --device cpu"
            )
        })
}

#[cfg(not(feature = "gpu"))]
fn gpu_device() -> Result<Device> {
    bail!("--device vulkan needs a GPU build: cargo build --release --features gpu")
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!(
        "--device cuda needs a CUDA build: cargo build --release --features cuda (downloads burn's LLVM bundle)"
    )
}

/// The device deeprank computes on (the CPU unless [`set_device`] chose another).
pub fn device() -> Device {
    DEVICE.get().cloned().unwrap_or_else(Device::flex)
}

/// Whether deeprank computes on the CPU (burn's flex backend), where its own engine runs.
pub fn on_cpu() -> bool {
    DEVICE.get().is_none_or(|d| *d == Device::flex())
}

/// `a · b` for `a: [n, k]` and `b: [k, m]`, on the tensors' device.
///
/// On the CPU, burn's matmul. On a GPU, a 1×1 convolution of the `n` rows as `n` one-pixel images of
/// `k` channels by `m` filters: on a device without cooperative-matrix support burn 0.22.1's matmul
/// launches cubek's "unit" kernel, which crashes Mesa's lavapipe (SIGSEGV in
/// `vkCreateComputePipelines`, Mesa 22.3 and 25.0), while burn's direct convolution runs there,
/// forward and backward. The products this is used for (the heads, the Gram matrix of a batch) are
/// small, so the convolution costs nothing that matters on a real GPU.
pub fn matmul(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    if a.device() == Device::flex() {
        a.matmul(b)
    } else {
        matmul_by_conv(a, b)
    }
}

fn matmul_by_conv(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    let ([n, k], [k2, m]) = (a.dims(), b.dims());
    assert_eq!(k, k2, "matmul: [{n}, {k}] · [{k2}, {m}]");
    let x = a.reshape([n, k, 1, 1]);
    let w = b.transpose().reshape([m, k, 1, 1]);
    let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    conv2d(x, w, None, options).reshape([n, m])
}

/// `layer`'s output for the rows of `x` (burn's `Linear::forward` on the CPU; on a GPU, as [`matmul`]).
pub fn linear(layer: &Linear, x: Tensor<2>) -> Tensor<2> {
    if x.device() == Device::flex() {
        return layer.forward(x);
    }
    let y = matmul_by_conv(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// A tensor's values, row-major, on the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's formulation, run on the CPU, equals burn's matmul.
    #[test]
    fn matmul_by_conv_equals_matmul() {
        let dev = Device::flex();
        let (n, k, m) = (5, 7, 3);
        let a: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let b: Vec<f32> = (0..k * m)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let a = Tensor::<2>::from_data(TensorData::new(a, [n, k]), &dev);
        let b = Tensor::<2>::from_data(TensorData::new(b, [k, m]), &dev);
        let want = to_vec(a.clone().matmul(b.clone())).unwrap();
        let got = to_vec(matmul_by_conv(a, b)).unwrap();
        assert_eq!(got.len(), n * m);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }
}
