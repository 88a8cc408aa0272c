//! Minimal reader for little-endian f32 C-order 2-D `.npy` files.
use std::io::Read;

pub fn read_f32(path: &str) -> std::io::Result<(Vec<f32>, usize, usize)> {
    let mut f = std::fs::File::open(path)?;
    let mut pre = [0u8; 10];
    f.read_exact(&mut pre)?;
    let hl = if pre[6] == 1 { u16::from_le_bytes([pre[8], pre[9]]) as usize } else {
        let mut b = [0u8; 2];
        f.read_exact(&mut b)?;
        u32::from_le_bytes([pre[8], pre[9], b[0], b[1]]) as usize
    };
    let mut h = vec![0u8; hl];
    f.read_exact(&mut h)?;
    let h = String::from_utf8_lossy(&h).to_string();
    assert!(h.contains("'<f4'") && h.contains("'fortran_order': False"), "need <f4 C-order: {h}");
    let s = &h[h.find("'shape': (").unwrap() + 10..];
    let s = &s[..s.find(')').unwrap()];
    let dims: Vec<usize> = s.split(',').filter_map(|t| t.trim().parse().ok()).collect();
    let (n, d) = (dims[0], dims[1]);
    let mut v = vec![0f32; n * d];
    // SAFETY: reading bytes into an f32 buffer of exactly that size.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * d * 4) };
    f.read_exact(bytes)?;
    Ok((v, n, d))
}
