//! A minimal `.npy` reader for the reference tensors: version 1–3 headers, little-endian,
//! C order, float32 (`<f4`) or int64 (`<i8`).

use std::path::Path;

use ndarray::ArrayD;

/// The header fields of one `.npy` file and its raw data.
struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read(path: &Path) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).expect("ASCII header");
    let field = |key: &str| {
        let start =
            header.find(key).unwrap_or_else(|| panic!("{}: no {key} in header", path.display())) + key.len();
        header[start..].trim_start_matches([':', ' ']).to_string()
    };
    assert!(field("'fortran_order'").starts_with("False"), "{}: Fortran order", path.display());
    let descr = field("'descr'").trim_start_matches('\'').split('\'').next().unwrap_or_default().to_string();
    let shape_text = field("'shape'");
    let shape = shape_text[1..shape_text.find(')').expect("shape tuple")]
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .map(|d| d.trim().parse().expect("shape dimension"))
        .collect();
    Npy { descr, shape, data: bytes[header_start + header_len..].to_vec() }
}

/// A float32 array.
pub fn read_f32(path: &Path) -> ArrayD<f32> {
    let npy = read(path);
    assert_eq!(npy.descr, "<f4", "{}: expected float32", path.display());
    let values = npy.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(npy.shape, values).expect("data matches shape")
}

/// An int64 array.
pub fn read_i64(path: &Path) -> ArrayD<i64> {
    let npy = read(path);
    assert_eq!(npy.descr, "<i8", "{}: expected int64", path.display());
    let values =
        npy.data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
    ArrayD::from_shape_vec(npy.shape, values).expect("data matches shape")
}

/// The timesteps file of a case, whichever dtype the scheduler used, as float32.
pub fn read_as_f32(path: &Path) -> ArrayD<f32> {
    match read(path).descr.as_str() {
        "<i8" => read_i64(path).mapv(|v| v as f32),
        _ => read_f32(path),
    }
}
