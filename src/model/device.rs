//! Where deeprank computes: the process's burn device (the CPU unless `--device` chose a GPU) and
//! rayon's thread pool, and the one way tensors come back to the host.

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;

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

#[cfg(feature = "gpu")]
fn gpu_device() -> Result<Device> {
    Ok(Device::vulkan(Default::default()))
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

/// A tensor's values, row-major, on the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow!("{e:?}"))
}
