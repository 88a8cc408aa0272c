//! What a run reports per epoch: the row of `metrics.csv` and the plot.

use crate::render::plot;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One epoch's numbers (a row of `metrics.csv`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub steps: usize,
    pub triplets: usize,
    pub mean_loss: f64,
    pub triplet_accuracy: f64,
    pub lr: f64,
    pub p_at_1: Option<f64>,
    pub p_at_10: Option<f64>,
    pub p_at_30: Option<f64>,
    pub map_at_r: Option<f64>,
    /// Cumulative training seconds (steps only) and wall seconds since the run began.
    pub train_seconds: f64,
    pub wall_seconds: f64,
}

pub const METRICS: &str = "metrics.csv";
pub const PLOT: &str = "plot.png";

/// Writes `metrics.csv` (atomically) and `plot.png` from the epochs so far.
pub fn write_metrics(run: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut s = String::from(
        "epoch,steps,triplets,mean_loss,triplet_accuracy,lr,p_at_1,p_at_10,p_at_30,map_at_r,train_seconds,wall_seconds\n",
    );
    let o = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
    for h in history {
        s += &format!(
            "{},{},{},{:.5},{:.4},{:e},{},{},{},{},{:.1},{:.1}\n",
            h.epoch,
            h.steps,
            h.triplets,
            h.mean_loss,
            h.triplet_accuracy,
            h.lr,
            o(h.p_at_1),
            o(h.p_at_10),
            o(h.p_at_30),
            o(h.map_at_r),
            h.train_seconds,
            h.wall_seconds
        );
    }
    let tmp = run.join("metrics.csv.tmp");
    std::fs::write(&tmp, s)?;
    std::fs::rename(&tmp, run.join(METRICS))?;
    let loss: Vec<f64> = history.iter().map(|h| h.mean_loss).collect();
    let p30: Vec<Option<f64>> = history.iter().map(|h| h.p_at_30).collect();
    plot::write(&run.join(PLOT), &loss, &p30)
}
