//! Crash-safe checkpoints: one file holding the training state (config, position, learning rate,
//! plateau state, metrics so far), the model record and the optimiser record. Written to a
//! temporary file, synced, then renamed over the previous one, so a crash mid-write never leaves a
//! broken latest checkpoint.

use crate::model::net::EmbedNet;
use crate::train::config::TrainConfig;
use crate::train::report::EpochMetrics;
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

pub const CHECKPOINT: &str = "checkpoint.bin";

/// Sums over the steps of the current epoch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Accum {
    pub loss: f64,
    pub accuracy: f64,
    pub steps: usize,
    pub triplets: usize,
}

/// Where a run stands (saved in every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub config: TrainConfig,
    /// Completed epochs.
    pub epoch: usize,
    /// Steps done in the current epoch.
    pub step_in_epoch: usize,
    pub global_step: usize,
    pub lr_scale: f64,
    pub best: Option<f64>,
    pub bad_epochs: usize,
    pub history: Vec<EpochMetrics>,
    pub accum: Accum,
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub skipped_images: Vec<String>,
}

/// The checkpoint to resume from when `resume` (its state and parts, after checking that it was
/// made with `cfg`, unless `force`); None when starting. Refuses to start over a run without
/// `force`.
pub fn resume_point(
    cfg: &TrainConfig,
    run: &Path,
    resume: bool,
    force: bool,
) -> Result<Option<(TrainState, Parts)>> {
    let ckpt_path = run.join(CHECKPOINT);
    if resume {
        if !ckpt_path.is_file() {
            bail!("nothing to resume: {} has no {CHECKPOINT}", run.display());
        }
        let parts = read(&ckpt_path)?;
        let state: TrainState = serde_json::from_slice(&parts.state_json)
            .with_context(|| format!("{} is damaged", ckpt_path.display()))?;
        let diff = cfg.differences(&state.config);
        if !diff.is_empty() && !force {
            bail!(
                "the run in {} was started with another config ({}); resume with the same flags, or add --force",
                run.display(),
                diff.join("; ")
            );
        }
        return Ok(Some((state, parts)));
    } else if ckpt_path.exists() && !force {
        bail!(
            "{} already holds a run: add --resume to continue it, --force to start over, or pick another --out",
            run.display()
        );
    }
    Ok(None)
}

/// Loads a checkpoint's model and optimiser records into `model` and `optim`.
pub fn restore(
    parts: Parts,
    model: EmbedNet,
    optim: ModuleOptimizer,
) -> Result<(EmbedNet, ModuleOptimizer)> {
    let rec = ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(parts.model))
        .map_err(|e| anyhow!("checkpoint model: {e:?}"))?;
    let model = model
        .try_load_record(rec)
        .map_err(|e| anyhow!("checkpoint model: {e:?}"))?;
    let optim = optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(parts.optimizer))
        .map_err(|e| anyhow!("checkpoint optimizer: {e:?}"))?;
    Ok((model, optim))
}

/// Writes the run's checkpoint (atomically): `state`, the model and the optimiser.
pub fn save_checkpoint(
    run: &Path,
    model: &EmbedNet,
    optim: &ModuleOptimizer,
    state: &TrainState,
) -> Result<()> {
    let rec = model
        .valid()
        .into_record()
        .into_bytes()
        .map_err(|e| anyhow!("model record: {e:?}"))?;
    let opt = optim
        .into_bytes()
        .map_err(|e| anyhow!("optimizer record: {e:?}"))?;
    write(
        &run.join(CHECKPOINT),
        &Parts {
            state_json: serde_json::to_vec(state)?,
            model: rec.to_vec(),
            optimizer: opt.to_vec(),
        },
    )
}

const MAGIC: &[u8; 8] = b"DRCKPT01";

/// The three parts of a checkpoint.
pub struct Parts {
    pub state_json: Vec<u8>,
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
}

/// Writes `parts` to `path` atomically.
pub fn write(path: &Path, parts: &Parts) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(MAGIC)?;
        for p in [&parts.state_json, &parts.model, &parts.optimizer] {
            f.write_all(&(p.len() as u64).to_le_bytes())?;
            f.write_all(p)?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a checkpoint written by [`write`].
pub fn read(path: &Path) -> Result<Parts> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bad = || {
        format!(
            "{} is not a deeprank checkpoint (or is damaged)",
            path.display()
        )
    };
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        bail!(bad());
    }
    let mut at = 8;
    let mut take = || -> Result<Vec<u8>> {
        if bytes.len() < at + 8 {
            bail!(bad());
        }
        let n = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        at += 8;
        // A damaged length may be any 64-bit number: compare without overflowing.
        let n = match usize::try_from(n) {
            Ok(n) if n <= bytes.len() - at => n,
            _ => bail!(bad()),
        };
        let v = bytes[at..at + n].to_vec();
        at += n;
        Ok(v)
    };
    let state_json = take()?;
    let model = take()?;
    let optimizer = take()?;
    Ok(Parts {
        state_json,
        model,
        optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint.bin");
        let parts = Parts {
            state_json: b"{\"a\":1}".to_vec(),
            model: vec![1, 2, 3],
            optimizer: vec![],
        };
        write(&p, &parts).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back.state_json, parts.state_json);
        assert_eq!(back.model, parts.model);
        assert!(back.optimizer.is_empty());
        assert!(!p.with_extension("tmp").exists());
        let raw = std::fs::read(&p).unwrap();
        std::fs::write(&p, &raw[..raw.len() - 2]).unwrap();
        assert!(read(&p).is_err());
    }
}
