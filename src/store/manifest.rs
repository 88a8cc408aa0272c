//! `manifest.tsv`, one line per row of `vectors.npy`: every read and write of its lines is here.
//! Format 1 (before `state.json`): `path  class_id  class_name`. Format 2:
//! `id  path  class_id  class_name  sha256  size  mtime_ns`, `-` for an unknown value.

use crate::store::db::Entry;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const HEADER_V1: &str = "path\tclass_id\tclass_name";
pub const HEADER_V2: &str = "id\tpath\tclass_id\tclass_name\tsha256\tsize\tmtime_ns";

/// What the file of a row was when it was embedded: its content hash, size and modification time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    pub sha256: Option<[u8; 32]>,
    pub size: Option<u64>,
    pub mtime_ns: Option<i64>,
}

/// Size and modification time (ns since the epoch) of a file.
pub fn stat(path: &Path) -> std::io::Result<(u64, i64)> {
    let m = std::fs::metadata(path)?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Ok((m.len(), mtime))
}

/// SHA-256 of some bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Stamp {
    /// Reads the file: its hash, size and time.
    pub fn of_file(path: &Path) -> Result<Stamp> {
        let (size, mtime) =
            stat(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(Stamp {
            sha256: Some(h.finalize().into()),
            size: Some(size),
            mtime_ns: Some(mtime),
        })
    }

    pub fn hex(&self) -> String {
        self.sha256.map(|h| hex(&h)).unwrap_or_else(|| "-".into())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn clean_field(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// A path as a manifest field (the one place paths are written).
fn path_field(p: &Path) -> String {
    escape_path(p)
}

/// A manifest path field back as a path (the one place paths are read).
fn parse_path(s: &str) -> PathBuf {
    unescape_path(s)
}

/// Writes a path as one manifest field, losslessly: `\` becomes `\\`, tab, newline and carriage
/// return become `\t`, `\n`, `\r`, and each byte of a file name that is not UTF-8 becomes `\xHH`.
/// Plain UTF-8 paths without those characters are written as they are. [`unescape_path`] reverses it.
pub fn escape_path(path: &Path) -> String {
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    #[cfg(not(unix))]
    let lossy = path.to_string_lossy();
    #[cfg(not(unix))]
    let bytes = lossy.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// Serialises a path as text: as it is when it is UTF-8, else in the manifest's escaped form
/// (JSON cannot hold the raw bytes).
pub fn serialize_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    match path.to_str() {
        Some(t) => s.serialize_str(t),
        None => s.serialize_str(&escape_path(path)),
    }
}

/// Reads a manifest path field written by [`escape_path`]. A backslash that starts no escape is
/// kept as it is (manifests written before escaping hold such paths verbatim).
pub fn unescape_path(field: &str) -> PathBuf {
    let s = field.as_bytes();
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            let hex = |j: usize| s.get(j).and_then(|&c| (c as char).to_digit(16));
            let (byte, len) = match s.get(i + 1) {
                Some(b'\\') => (b'\\', 2),
                Some(b't') => (b'\t', 2),
                Some(b'n') => (b'\n', 2),
                Some(b'r') => (b'\r', 2),
                Some(b'x') => match (hex(i + 2), hex(i + 3)) {
                    (Some(h), Some(l)) => ((h * 16 + l) as u8, 4),
                    _ => (b'\\', 1),
                },
                _ => (b'\\', 1),
            };
            out.push(byte);
            i += len;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    #[cfg(unix)]
    {
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Writes a format-1 line (`embed --text`'s companion and old DBs).
pub fn write_v1(out: &mut impl Write, e: &Entry) -> std::io::Result<()> {
    writeln!(
        out,
        "{}\t{}\t{}",
        path_field(&e.path),
        clean_field(&e.class_id),
        clean_field(&e.class_name)
    )
}

/// Writes a format-2 line.
pub fn write_v2(out: &mut impl Write, id: u64, e: &Entry, s: &Stamp) -> std::io::Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "{id}\t{}\t{}\t{}\t{}\t{}\t{}",
        path_field(&e.path),
        clean_field(&e.class_id),
        clean_field(&e.class_name),
        s.hex(),
        opt(s.size.map(|v| v.to_string())),
        opt(s.mtime_ns.map(|v| v.to_string())),
    )
}

/// The rows of a manifest: entries, and in format 2 ids and stamps.
#[derive(Default)]
pub struct Rows {
    pub entries: Vec<Entry>,
    pub ids: Vec<u64>,
    pub stamps: Vec<Stamp>,
}

/// Parses manifest text (header line first). Format 1 rows get ids 0, 1, … and unknown stamps.
pub fn parse(text: &[u8], file: &Path, v2: bool) -> Result<Rows> {
    let text = std::str::from_utf8(text).with_context(|| {
        format!(
            "{} is damaged (not UTF-8 text): re-run embed",
            file.display()
        )
    })?;
    let mut rows = Rows::default();
    let mut lines = text.split_terminator('\n');
    let header = lines.next().unwrap_or("");
    let want = if v2 { HEADER_V2 } else { HEADER_V1 };
    if !header.starts_with(want) {
        bail!(
            "{} does not start with the header {want:?}: it is damaged or from another version",
            file.display()
        );
    }
    for (i, line) in lines.enumerate() {
        let bad = || format!("{} line {} is damaged", file.display(), i + 2);
        let mut f = line.split('\t');
        let id = if v2 {
            f.next()
                .and_then(|s| s.parse::<u64>().ok())
                .with_context(bad)?
        } else {
            i as u64
        };
        let (Some(path), Some(cid), Some(cname)) = (f.next(), f.next(), f.next()) else {
            bail!(bad());
        };
        let stamp = if v2 {
            let (Some(h), Some(sz), Some(mt)) = (f.next(), f.next(), f.next()) else {
                bail!(bad());
            };
            Stamp {
                sha256: if h == "-" {
                    None
                } else {
                    Some(unhex(h).with_context(bad)?)
                },
                size: sz.parse().ok(),
                mtime_ns: mt.parse().ok(),
            }
        } else {
            Stamp::default()
        };
        rows.entries.push(Entry {
            path: parse_path(path),
            class_id: cid.to_string(),
            class_name: cname.to_string(),
        });
        rows.ids.push(id);
        rows.stamps.push(stamp);
    }
    Ok(rows)
}

/// Parses `removed.tsv`: one removed id per line.
pub fn parse_removed(text: &[u8], file: &Path) -> Result<Vec<u64>> {
    let text =
        std::str::from_utf8(text).with_context(|| format!("{} is damaged", file.display()))?;
    text.split_terminator('\n')
        .enumerate()
        .map(|(i, l)| {
            l.trim()
                .parse::<u64>()
                .with_context(|| format!("{} line {} is damaged", file.display(), i + 1))
        })
        .collect()
}
