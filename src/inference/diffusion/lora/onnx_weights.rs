//! Reads named initializers out of an ONNX file without loading the rest: a protobuf walk over
//! `ModelProto.graph.initializer` that seeks past every value it does not need. Values stored in
//! the file itself (`raw_data`, `float_data`) and in external data files are both read.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

// Field numbers from onnx.proto.
const MODEL_GRAPH: u64 = 7;
const GRAPH_INITIALIZER: u64 = 5;
const TENSOR_DIMS: u64 = 1;
const TENSOR_DATA_TYPE: u64 = 2;
const TENSOR_FLOAT_DATA: u64 = 4;
const TENSOR_NAME: u64 = 8;
const TENSOR_RAW_DATA: u64 = 9;
const TENSOR_EXTERNAL_DATA: u64 = 13;
const TENSOR_DATA_LOCATION: u64 = 14;
const DATA_LOCATION_EXTERNAL: u64 = 1;

/// Element type of a float initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FloatKind {
    F32,
    F16,
    Bf16,
}

impl FloatKind {
    fn from_onnx(data_type: u64) -> Option<FloatKind> {
        match data_type {
            1 => Some(FloatKind::F32),
            10 => Some(FloatKind::F16),
            16 => Some(FloatKind::Bf16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            FloatKind::F16 | FloatKind::Bf16 => 2,
        }
    }
}

/// One initializer's values, widened to float32.
#[derive(Debug, Clone)]
pub(super) struct Initializer {
    pub(super) dims: Vec<usize>,
    pub(super) kind: FloatKind,
    pub(super) values: Vec<f32>,
    /// Byte offset of the values in the model file; `None` when they live in an external file.
    pub(super) offset_in_model: Option<u64>,
}

impl FloatKind {
    /// `values` in this type's little-endian bytes, as ONNX stores them.
    pub(super) fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            FloatKind::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatKind::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            FloatKind::Bf16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    }
}

/// Where an initializer's bytes are.
enum Location {
    /// Bytes at this offset of the model file.
    Inline { offset: u64, len: u64 },
    /// Packed float32 `float_data` at this offset of the model file.
    FloatData { offset: u64, len: u64 },
    /// An external data file beside the model.
    External { file: PathBuf, offset: u64, len: Option<u64> },
}

/// Reads the initializers called `names` from the ONNX file at `path`; an error names the first
/// one missing or unreadable.
pub(super) fn read_initializers(
    path: &Path,
    names: &BTreeSet<&str>,
) -> Result<BTreeMap<String, Initializer>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut reader = Walker { inner: BufReader::with_capacity(1 << 16, file), pos: 0 };
    let mut found = Vec::new();
    while reader.pos < len {
        let (field, wire) = reader.key()?;
        if field == MODEL_GRAPH && wire == 2 {
            let graph_end = reader.pos + reader.varint()?;
            while reader.pos < graph_end {
                let (field, wire) = reader.key()?;
                if field == GRAPH_INITIALIZER && wire == 2 {
                    let tensor_end = reader.pos + reader.varint()?;
                    if let Some(tensor) = reader.tensor(tensor_end, path)?
                        && names.contains(tensor.0.as_str())
                    {
                        found.push(tensor);
                    }
                } else {
                    reader.skip(wire)?;
                }
            }
        } else {
            reader.skip(wire)?;
        }
    }
    let mut out = BTreeMap::new();
    for (name, dims, kind, location) in found {
        let initializer = load_initializer(path, &name, dims, kind, location)?;
        out.insert(name, initializer);
    }
    if let Some(missing) = names.iter().find(|n| !out.contains_key(**n)) {
        return Err(format!("the model has no float initializer named {missing:?}"));
    }
    Ok(out)
}

/// The values of one float initializer, read from wherever its header says they are.
fn load_initializer(
    path: &Path,
    name: &str,
    dims: Vec<usize>,
    kind: FloatKind,
    location: Location,
) -> Result<Initializer, String> {
    let count: usize = dims.iter().product();
    let offset_in_model = match &location {
        Location::Inline { offset, .. } | Location::FloatData { offset, .. } => Some(*offset),
        Location::External { .. } => None,
    };
    let bytes = match location {
        Location::Inline { offset, len } | Location::FloatData { offset, len } => {
            read_range(path, offset, len)?
        }
        Location::External { file, offset, len } => {
            let len = len.unwrap_or((count * kind.size()) as u64);
            read_range(&file, offset, len)?
        }
    };
    if bytes.len() != count * kind.size() {
        return Err(format!("initializer {name:?} holds {} bytes for shape {dims:?}", bytes.len()));
    }
    let values = match kind {
        FloatKind::F32 => {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        FloatKind::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        FloatKind::Bf16 => {
            bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
    };
    Ok(Initializer { dims, kind, values, offset_in_model })
}

fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; len as usize];
    file.read_exact(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}

/// A protobuf reader that knows its position, so fields can be skipped by seeking.
struct Walker {
    inner: BufReader<File>,
    pos: u64,
}

type TensorHeader = (String, Vec<usize>, FloatKind, Location);

impl Walker {
    fn byte(&mut self) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.inner.read_exact(&mut b).map_err(|_| "the ONNX file ends inside a message".to_string())?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("malformed varint in the ONNX file".into())
    }

    fn key(&mut self) -> Result<(u64, u8), String> {
        let key = self.varint()?;
        Ok((key >> 3, (key & 7) as u8))
    }

    fn bytes(&mut self, len: u64) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(|_| "the ONNX file ends inside a field".to_string())?;
        self.pos += len;
        Ok(buf)
    }

    fn seek_forward(&mut self, len: u64) -> Result<(), String> {
        self.inner.seek_relative(len as i64).map_err(|e| e.to_string())?;
        self.pos += len;
        Ok(())
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.seek_forward(8),
            2 => {
                let len = self.varint()?;
                self.seek_forward(len)
            }
            5 => self.seek_forward(4),
            other => Err(format!("unsupported protobuf wire type {other} in the ONNX file")),
        }
    }

    /// Parses one StringStringEntryProto (`key`, `value`) ending at `end`.
    fn string_pair(&mut self, end: u64) -> Result<(String, String), String> {
        let (mut key, mut value) = (String::new(), String::new());
        while self.pos < end {
            let (field, wire) = self.key()?;
            match (field, wire) {
                (1 | 2, 2) => {
                    let len = self.varint()?;
                    let text = String::from_utf8_lossy(&self.bytes(len)?).into_owned();
                    if field == 1 { key = text } else { value = text }
                }
                _ => self.skip(wire)?,
            }
        }
        Ok((key, value))
    }

    /// Parses one TensorProto ending at `end`; `None` for tensors that are not float.
    fn tensor(&mut self, end: u64, model: &Path) -> Result<Option<TensorHeader>, String> {
        let (mut name, mut dims, mut data_type) = (String::new(), Vec::new(), 0);
        let (mut inline, mut float_data, mut external, mut is_external) = (None, None, Vec::new(), false);
        while self.pos < end {
            let (field, wire) = self.key()?;
            match (field, wire) {
                (TENSOR_DIMS, 0) => dims.push(self.varint()? as usize),
                (TENSOR_DIMS, 2) => {
                    let packed_end = self.pos + self.varint()?;
                    while self.pos < packed_end {
                        dims.push(self.varint()? as usize);
                    }
                }
                (TENSOR_DATA_TYPE, 0) => data_type = self.varint()?,
                (TENSOR_NAME, 2) => {
                    let len = self.varint()?;
                    name = String::from_utf8_lossy(&self.bytes(len)?).into_owned();
                }
                (TENSOR_RAW_DATA, 2) => {
                    let len = self.varint()?;
                    inline = Some((self.pos, len));
                    self.seek_forward(len)?;
                }
                (TENSOR_FLOAT_DATA, 2) => {
                    let len = self.varint()?;
                    float_data = Some((self.pos, len));
                    self.seek_forward(len)?;
                }
                (TENSOR_EXTERNAL_DATA, 2) => {
                    let entry_end = self.pos + self.varint()?;
                    external.push(self.string_pair(entry_end)?);
                }
                (TENSOR_DATA_LOCATION, 0) => is_external = self.varint()? == DATA_LOCATION_EXTERNAL,
                _ => self.skip(wire)?,
            }
        }
        let Some(kind) = FloatKind::from_onnx(data_type) else { return Ok(None) };
        let location = if is_external {
            external_location(&name, &external, model)?
        } else if let Some((offset, len)) = inline {
            Location::Inline { offset, len }
        } else if let Some((offset, len)) = float_data.filter(|_| kind == FloatKind::F32) {
            Location::FloatData { offset, len }
        } else {
            return Ok(None);
        };
        Ok(Some((name, dims, kind, location)))
    }
}

/// Where the external data of initializer `name` lives, from its `external_data` entries; refuses
/// paths that leave the directory of `model`.
fn external_location(name: &str, external: &[(String, String)], model: &Path) -> Result<Location, String> {
    let get = |k: &str| external.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let file = get("location").ok_or_else(|| format!("initializer {name:?} has no external location"))?;
    let relative = Path::new(file);
    if relative.is_absolute() || relative.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("initializer {name:?} points outside the model directory: {file}"));
    }
    let number = |k: &str| get(k).map(|v| v.parse::<u64>().map_err(|e| format!("{k}: {e}"))).transpose();
    Ok(Location::External {
        file: model.parent().unwrap_or(Path::new(".")).join(relative),
        offset: number("offset")?.unwrap_or(0),
        len: number("length")?,
    })
}
