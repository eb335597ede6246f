//! The safetensors container: an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the data. Adapters are listed from the header alone;
//! their values are read only when a request merges them.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};
use serde::Deserialize;

/// Largest header accepted; real adapters have headers of a few hundred KiB.
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// Element types adapters are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Debug, Clone)]
pub(super) struct TensorEntry {
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    /// Byte range within the data section.
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub(super) fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed header: tensors by name and the free-form `__metadata__` strings.
#[derive(Debug, Clone, Default)]
pub(super) struct Header {
    pub(super) tensors: BTreeMap<String, TensorEntry>,
    pub(super) metadata: BTreeMap<String, String>,
    /// Offset of the data section in the file.
    data_offset: u64,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Reads and checks the header of `path`: every tensor's dtype is one adapters use, its byte range
/// matches its shape and lies inside the file, and ranges do not overlap.
pub(super) fn read_header(path: &Path) -> Result<Header, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| "file is shorter than a safetensors header".to_string())?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(format!("header length {header_len} does not fit the file ({file_len} bytes)"));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(|e| e.to_string())?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let data_len = (file_len - 8 - header_len) as usize;
    let mut header = Header { data_offset: 8 + header_len, ..Header::default() };
    let mut ranges = Vec::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            header.metadata = serde_json::from_value(value)
                .map_err(|e| format!("__metadata__ must map strings to strings: {e}"))?;
            continue;
        }
        let entry: RawEntry = serde_json::from_value(value).map_err(|e| format!("tensor {name:?}: {e}"))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            other => return Err(format!("tensor {name:?} has dtype {other}; adapters use F32, F16 or BF16")),
        };
        let (start, end) = entry.data_offsets;
        let elements = entry.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let expected = elements.and_then(|n| n.checked_mul(dtype.size()));
        if start > end || end > data_len || expected != Some(end - start) {
            return Err(format!(
                "tensor {name:?} claims bytes {start}..{end} for shape {:?} {}, which does not fit the {data_len}-byte data section",
                entry.shape, entry.dtype
            ));
        }
        ranges.push((start, end));
        header.tensors.insert(name, TensorEntry { dtype, shape: entry.shape, start, end });
    }
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err("tensors overlap in the data section".into());
    }
    Ok(header)
}

/// The whole data section of a file whose header was read with [`read_header`].
pub(super) fn read_data(path: &Path, header: &Header) -> Result<Vec<u8>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::Start(header.data_offset)).map_err(|e| e.to_string())?;
    let mut data = vec![0u8; header.tensors.values().map(|t| t.end).max().unwrap_or(0)];
    file.read_exact(&mut data).map_err(|_| "file was truncated after it was listed".to_string())?;
    Ok(data)
}

/// One tensor's values as float32, read from the file by itself (for small tensors such as alphas).
pub(super) fn read_tensor(path: &Path, header: &Header, key: &str) -> Result<Vec<f32>, String> {
    let entry = header.tensors.get(key).ok_or_else(|| format!("no tensor {key:?}"))?;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::Start(header.data_offset + entry.start as u64)).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; entry.end - entry.start];
    file.read_exact(&mut bytes).map_err(|e| e.to_string())?;
    let local = TensorEntry { start: 0, end: bytes.len(), ..entry.clone() };
    to_f32(&bytes, &local)
}

/// The tensor's values as float32 (from the data section returned by [`read_data`]); refuses NaN
/// and infinity, which would poison every image the adapter touches.
pub(super) fn to_f32(data: &[u8], entry: &TensorEntry) -> Result<Vec<f32>, String> {
    let bytes = &data[entry.start..entry.end];
    let values: Vec<f32> = match entry.dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err("holds NaN or infinite values".into());
    }
    Ok(values)
}
