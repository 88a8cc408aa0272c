//! Crash-safe checkpoints: one file holding the training state (config, position, learning rate,
//! plateau state, metrics so far), the model record and the optimiser record. Written to a
//! temporary file, synced, then renamed over the previous one, so a crash mid-write never leaves a
//! broken latest checkpoint.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;

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
        let n = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        at += 8;
        if bytes.len() < at + n {
            bail!(bad());
        }
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
