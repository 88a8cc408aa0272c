//! The run-folder format as inference sees it: `config.json` (the run's identity, among the
//! training settings) and `model.bpk` (the embedding network's weights).

use crate::model::device::device;
use crate::model::identity::RunIdentity;
use crate::model::lite::Lite;
use crate::model::net::EmbedNet;
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use std::path::Path;

pub const CONFIG: &str = "config.json";
pub const MODEL: &str = "model.bpk";

/// Loads a finished (or running) run's network for inference.
pub fn load_run(run: &Path) -> Result<(RunIdentity, EmbedNet)> {
    let cfg_path = run.join(CONFIG);
    let cfg: RunIdentity = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{} is not a training run (no {CONFIG})", run.display()))?,
    )
    .with_context(|| format!("{} is damaged", cfg_path.display()))?;
    let model_path = run.join(MODEL);
    if !model_path.is_file() {
        bail!(
            "{} has no {MODEL} yet: let the training finish an epoch",
            run.display()
        );
    }
    let dev = device();
    let net = EmbedNet::new(
        Lite::new(cfg.backbone, &dev),
        cfg.arch,
        cfg.dim,
        cfg.normalize,
        &dev,
    );
    let net = net
        .try_load_file(&model_path)
        .map_err(|e| anyhow!("cannot load {}: {e:?}", model_path.display()))?;
    Ok((cfg, net.valid()))
}

/// Writes the run's model for `embed/query/eval --model RUN_DIR` (atomically).
pub fn save_model(run: &Path, model: &EmbedNet) -> Result<()> {
    let tmp = run.join("model.tmp.bpk");
    model
        .valid()
        .save_file(&tmp)
        .map_err(|e| anyhow!("cannot save the model: {e:?}"))?;
    std::fs::rename(&tmp, run.join(MODEL))?;
    Ok(())
}
