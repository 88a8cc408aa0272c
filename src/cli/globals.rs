//! The flags every deeprank binary takes (`deeprank` and `deeprank-bench`), and applying them.

use anyhow::Result;
use deeprank::model::device;

#[derive(clap::Args)]
pub struct Globals {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Compute device: cpu, vulkan (build with --features gpu) or cuda (--features cuda).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
}

impl Globals {
    /// Sizes the thread pool and selects the device.
    pub fn apply(&self) -> Result<()> {
        if let Some(t) = self.threads {
            device::set_threads(t)?;
        }
        device::set_device(&self.device)
    }
}
