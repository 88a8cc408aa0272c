//! `.npy` files of f32 rows: streamed out with the shape written at the end, and read back through
//! a memory map.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

/// Header length of the npy files we write (a multiple of 64, so the data is aligned).
pub const NPY_HEADER: usize = 128;

/// The 128-byte header of an `[rows, dim]` f32 file (its length never depends on the shape).
pub fn npy_header(rows: usize, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    let mut h = Vec::with_capacity(NPY_HEADER);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    let len = (NPY_HEADER - 10) as u16;
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    while h.len() < NPY_HEADER - 1 {
        h.push(b' ');
    }
    h.push(b'\n');
    h
}

/// Streams rows of f32 into a `.npy` file; the shape is written on [`NpyWriter::finish`].
pub struct NpyWriter {
    file: BufWriter<File>,
    dim: usize,
    rows: usize,
}

impl NpyWriter {
    pub fn create(path: &Path, dim: usize) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        file.write_all(&npy_header(0, dim))?;
        Ok(Self { file, dim, rows: 0 })
    }

    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.dim {
            bail!("vector has {} values, expected {}", row.len(), self.dim);
        }
        for v in row {
            self.file.write_all(&v.to_le_bytes())?;
        }
        self.rows += 1;
        Ok(())
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn finish(mut self) -> Result<usize> {
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&npy_header(self.rows, self.dim))?;
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        Ok(self.rows)
    }
}

/// A memory-mapped `[rows, dim]` f32 npy file.
pub struct NpyMap {
    map: memmap2::Mmap,
    offset: usize,
    pub rows: usize,
    pub dim: usize,
}

impl NpyMap {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is only read; deeprank replaces DB folders by rename, never in place.
        let map = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let bad = || {
            format!(
                "{} is not a deeprank vectors file (f32 npy)",
                path.display()
            )
        };
        if map.len() < 10 || &map[..6] != b"\x93NUMPY" {
            bail!(bad());
        }
        let (hlen, start) = match map[6] {
            1 => (u16::from_le_bytes([map[8], map[9]]) as usize, 10),
            2 | 3 if map.len() >= 12 => (
                u32::from_le_bytes([map[8], map[9], map[10], map[11]]) as usize,
                12,
            ),
            _ => bail!(bad()),
        };
        let offset = start + hlen;
        if map.len() < offset {
            bail!(bad());
        }
        let header = std::str::from_utf8(&map[start..offset]).with_context(bad)?;
        if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
            bail!("{}: expected little-endian f32 in C order", bad());
        }
        let shape = header
            .split("'shape':")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .with_context(bad)?;
        let dims: Vec<usize> = shape
            .trim()
            .trim_start_matches('(')
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(bad)?;
        let [rows, dim] = dims[..] else {
            bail!("{}: expected a 2-d array", bad())
        };
        if dim == 0 {
            bail!("{}: vectors of dimension 0", bad());
        }
        // A damaged shape may be any number: compute the data length without overflowing.
        let data_len = rows
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(offset));
        if data_len != Some(map.len()) {
            let what = if data_len.is_some_and(|n| n < map.len()) {
                "too long"
            } else {
                "truncated"
            };
            bail!(
                "{} is {what}: header says {rows}x{dim} but the file has {} bytes; re-run embed",
                path.display(),
                map.len()
            );
        }
        if offset % 4 != 0 {
            bail!("{}: data is not 4-byte aligned", bad());
        }
        Ok(Self {
            map,
            offset,
            rows,
            dim,
        })
    }

    /// The first `rows` rows of a file written by deeprank, whatever its length and the shape its
    /// header says (format 2: the commit record knows the committed rows; rows past them are an
    /// uncommitted tail, and the header's shape may be a commit behind). Only that prefix is mapped.
    pub fn open_prefix(path: &Path, rows: usize, dim: usize) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut head = [0u8; NPY_HEADER];
        let got = std::io::Read::read(&mut &f, &mut head)?;
        if got < NPY_HEADER
            || &head[..8] != b"\x93NUMPY\x01\x00"
            || u16::from_le_bytes([head[8], head[9]]) as usize != NPY_HEADER - 10
            || !String::from_utf8_lossy(&head[10..60]).contains("'<f4'")
        {
            bail!(
                "{} is not a deeprank vectors file (f32 npy with a 128-byte header)",
                path.display()
            );
        }
        if dim == 0 {
            bail!("{}: vectors of dimension 0", path.display());
        }
        let have = f.metadata()?.len() as usize;
        let need = rows
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(NPY_HEADER))
            .unwrap_or(usize::MAX);
        if have < need {
            bail!(
                "{} is truncated: {have} bytes, fewer than the {need} of its {rows} committed rows (restore it or re-run embed)",
                path.display()
            );
        }
        // SAFETY: only the committed prefix is mapped, and no writer changes committed bytes in
        // place (appends go past it; compaction writes a new file and renames it over this one).
        let map = unsafe { memmap2::MmapOptions::new().len(need).map(&f) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Ok(Self {
            map,
            offset: NPY_HEADER,
            rows,
            dim,
        })
    }

    /// All vectors, row-major.
    pub fn data(&self) -> &[f32] {
        let bytes = &self.map[self.offset..];
        // SAFETY: the mapping is page-aligned and offset is a multiple of 4, so the f32 view is
        // aligned; any bit pattern is a valid f32; the length was checked against the shape.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, self.rows * self.dim) }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data()[i * self.dim..(i + 1) * self.dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose shape overflows `rows * dim * 4` to exactly the file's data length (0 here)
    /// must be refused, not mapped as 2^62 floats.
    #[test]
    fn npy_shape_overflow_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.npy");
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 1), }";
        let mut h = b"\x93NUMPY\x01\x00".to_vec();
        h.extend_from_slice(&((NPY_HEADER - 10) as u16).to_le_bytes());
        h.extend_from_slice(dict.as_bytes());
        h.resize(NPY_HEADER - 1, b' ');
        h.push(b'\n');
        std::fs::write(&p, &h).unwrap();
        let e = NpyMap::open(&p)
            .err()
            .expect("an overflowing shape was accepted");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
