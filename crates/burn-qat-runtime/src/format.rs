//! The integer model file: a versioned header, a checksum, and the model encoded with
//! `postcard` (int8 weights one byte each, integers as varints).
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `BQATINT8` |
//! | 4 | format version, little-endian (`3`: the integer model as a graph of nodes; versions 1 and 2 held a list of layers and are refused with a message) |
//! | 8 | payload length, little-endian |
//! | 4 | CRC-32 of the payload |
//! | n | payload |
//!
//! Loading checks every field before use ([`IntegerModel::validate`]): a truncated,
//! corrupted, foreign or inconsistent file is an error, never a panic, and so is a model whose
//! work or memory is above the [`Budget`] ([`load`] and [`from_bytes`] use
//! [`Budget::DEFAULT`]; [`load_with_budget`] and [`from_bytes_with_budget`] take another, which
//! the loaded model keeps for its `forward`). While decoding, nothing is allocated beyond the
//! decoded nodes, whose count is checked against the budget first. The model is written to
//! a temporary file and renamed, so a failed save leaves no partial file.
//!
//! ```
//! use burn_qat_runtime::format;
//! use burn_qat_runtime::model::{Dim, Grid, IntNode, IntOp, IntegerModel};
//!
//! let g = Grid { scale: 0.1, zero_point: 0, qmin: -128, qmax: 127 };
//! let shape = vec![Dim::Batch(1), Dim::Fixed(4)];
//! let input = IntNode { name: "input".into(), op: IntOp::Input, inputs: vec![], shape: shape.clone(), grid: None };
//! let quant = IntNode { name: "quant".into(), op: IntOp::Quantize(g), inputs: vec![0], shape, grid: Some(g) };
//! let model = IntegerModel::new(vec![input, quant], 1);
//! let bytes = format::to_bytes(&model);
//! assert_eq!(format::from_bytes(&bytes).unwrap(), model);
//! assert!(format::from_bytes(&bytes[..bytes.len() - 1]).is_err());
//! ```

use std::path::Path;

use thiserror::Error;

use crate::budget::{self, Budget};
use crate::model::IntegerModel;

/// File magic.
pub const MAGIC: &[u8; 8] = b"BQATINT8";
/// Current format version.
pub const VERSION: u32 = 3;
const HEADER: usize = 8 + 4 + 8 + 4;

/// Why an integer model file cannot be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not an integer model file, or a damaged one.
    #[error("not a valid burn-qat integer model: {0}")]
    Invalid(String),
    /// Another format version (versions 1 and 2 held the older list-of-layers model).
    #[error(
        "integer model format version {found}; this build reads version {VERSION} only \
         (versions 1 and 2 stored a list of layers, version 3 a graph of nodes): \
         convert the QAT model again with this build (or use the build that wrote the file)"
    )]
    Version {
        /// The file's version.
        found: u32,
    },
}

/// The file's bytes for `model`.
pub fn to_bytes(model: &IntegerModel) -> Vec<u8> {
    let payload = postcard::to_stdvec(model).expect("an integer model always serializes");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads a model from the file's bytes, with the default [`Budget`].
pub fn from_bytes(bytes: &[u8]) -> Result<IntegerModel, FormatError> {
    from_bytes_with_budget(bytes, Budget::DEFAULT)
}

/// The first varint of a postcard payload (the number of nodes), if it has one.
fn leading_varint(payload: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in payload.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7F).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Reads a model from the file's bytes, validated against `budget`, which the model keeps (see
/// [`IntegerModel::with_budget`]).
pub fn from_bytes_with_budget(bytes: &[u8], budget: Budget) -> Result<IntegerModel, FormatError> {
    if bytes.len() < HEADER {
        return Err(FormatError::Invalid(format!(
            "{} bytes, shorter than the {HEADER}-byte header",
            bytes.len()
        )));
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::Invalid(
            "wrong magic: not a burn-qat integer model file".into(),
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(FormatError::Invalid(format!(
            "the header announces {len} payload bytes, the file has {} (truncated?)",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(FormatError::Invalid(
            "checksum mismatch: the file is corrupted".into(),
        ));
    }
    // The payload begins with the number of nodes: their decoded size is checked before
    // they are decoded (a small node decodes to a few hundred bytes).
    if let Some(nodes) = leading_varint(payload)
        && budget::decoded_bytes(nodes) > budget.max_memory_bytes
    {
        return Err(FormatError::Invalid(format!(
            "{nodes} nodes take {} bytes once decoded, above the budget's max_memory_bytes of \
             {}: a model from a trusted source can have more with `format::load_with_budget`",
            budget::decoded_bytes(nodes),
            budget.max_memory_bytes
        )));
    }
    let model: IntegerModel =
        postcard::from_bytes(payload).map_err(|e| FormatError::Invalid(format!("payload: {e}")))?;
    let model = model.with_budget(budget);
    model
        .validate()
        .map_err(|e| FormatError::Invalid(e.to_string()))?;
    Ok(model)
}

/// Writes `model` to `path` (through a temporary file in the same directory).
pub fn save(model: &IntegerModel, path: &Path) -> Result<(), FormatError> {
    let io = |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, to_bytes(model)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Reads a model from `path`, with the default [`Budget`].
pub fn load(path: &Path) -> Result<IntegerModel, FormatError> {
    load_with_budget(path, Budget::DEFAULT)
}

/// Reads a model from `path`, validated against `budget`, which the model keeps (see
/// [`IntegerModel::with_budget`]).
pub fn load_with_budget(path: &Path, budget: Budget) -> Result<IntegerModel, FormatError> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
        path: path.display().to_string(),
        source,
    })?;
    from_bytes_with_budget(&bytes, budget)
}
