//! The integer model file: a versioned header, a checksum, and the model encoded with
//! `postcard` (int8 weights one byte each, integers as varints).
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `BQATINT8` |
//! | 4 | format version, little-endian (`2`; version 1 had no weight bit widths) |
//! | 8 | payload length, little-endian |
//! | 4 | CRC-32 of the payload |
//! | n | payload |
//!
//! Loading checks every field before use: a truncated, corrupted or foreign file is an error,
//! never a panic, and nothing larger than the file itself is allocated. The model is written to
//! a temporary file and renamed, so a failed save leaves no partial file.
//!
//! ```
//! use burn_qat_export::format;
//! use burn_qat_export::model::{ActQ, IntLayer, IntegerModel};
//!
//! let q = ActQ { scale: 0.1, zero_point: 0, qmin: -128, qmax: 127 };
//! let model = IntegerModel { input_shape: vec![4], layers: vec![IntLayer::Quantize(q)] };
//! let bytes = format::to_bytes(&model);
//! assert_eq!(format::from_bytes(&bytes).unwrap(), model);
//! assert!(format::from_bytes(&bytes[..bytes.len() - 1]).is_err());
//! ```

use std::path::Path;

use thiserror::Error;

use crate::model::IntegerModel;

/// File magic.
pub const MAGIC: &[u8; 8] = b"BQATINT8";
/// Current format version.
pub const VERSION: u32 = 2;
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
    /// Another format version.
    #[error(
        "integer model format version {found}; this build reads version {VERSION} only: \
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

/// Reads a model from the file's bytes.
pub fn from_bytes(bytes: &[u8]) -> Result<IntegerModel, FormatError> {
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
    let model: IntegerModel =
        postcard::from_bytes(payload).map_err(|e| FormatError::Invalid(format!("payload: {e}")))?;
    validate(&model)?;
    Ok(model)
}

/// Checks the invariants the kernels rely on (sizes agree), so a crafted file cannot make them
/// index out of bounds.
pub fn validate(model: &IntegerModel) -> Result<(), FormatError> {
    let shape = model.input_shape.clone();
    if shape.is_empty() || shape.len() > 3 || shape.contains(&0) {
        return Err(FormatError::Invalid(format!(
            "input shape {shape:?} is not [features] or [c, h, w]"
        )));
    }
    validate_layers(&model.layers, shape).map(|_| ())
}

fn validate_layers(
    layers: &[crate::model::IntLayer],
    shape: Vec<usize>,
) -> Result<Vec<usize>, FormatError> {
    use crate::model::{IntLayer, Output};
    let bad = |m: String| Err(FormatError::Invalid(m));
    let out_len = |o: &Output| match o {
        Output::Quantized { requant, .. } => requant.len(),
        Output::Float { scale, .. } => scale.len(),
    };
    let mut shape = shape;
    for (i, layer) in layers.iter().enumerate() {
        if let IntLayer::Residual { body, add } = layer {
            validate_layers(body, shape.clone())?;
            if add.shift == 0 || add.shift > 100 {
                return bad(format!(
                    "layer {i}: residual add shift {} out of 1..=100",
                    add.shift
                ));
            }
        }
        let Some(next) = layer.output_shape(&shape) else {
            return bad(format!(
                "layer {i} ({}) does not accept input of shape {shape:?}",
                layer.kind()
            ));
        };
        shape = next;
        match layer {
            IntLayer::Conv2d(c) => {
                if c.groups == 0
                    || c.in_channels % c.groups != 0
                    || c.out_channels % c.groups != 0
                    || c.stride.contains(&0)
                    || c.dilation.contains(&0)
                    || c.kernel.contains(&0)
                {
                    return bad(format!("layer {i}: inconsistent convolution geometry"));
                }
                let wlen = c
                    .out_channels
                    .checked_mul(c.in_channels / c.groups)
                    .and_then(|v| v.checked_mul(c.kernel[0] * c.kernel[1]));
                if wlen != Some(c.weight.len())
                    || c.bias.len() != c.out_channels
                    || c.weight_scale.len() != c.out_channels
                    || out_len(&c.output) != c.out_channels
                {
                    return bad(format!("layer {i}: convolution parameter sizes disagree"));
                }
            }
            IntLayer::Linear(l) => {
                if l.in_features.checked_mul(l.out_features) != Some(l.weight.len())
                    || l.bias.len() != l.out_features
                    || l.weight_scale.len() != l.out_features
                    || out_len(&l.output) != l.out_features
                {
                    return bad(format!("layer {i}: linear parameter sizes disagree"));
                }
            }
            IntLayer::MaxPool2d { kernel, stride } | IntLayer::AvgPool2d { kernel, stride } => {
                if kernel.contains(&0) || stride.contains(&0) {
                    return bad(format!("layer {i}: zero pooling size"));
                }
            }
            _ => {}
        }
    }
    Ok(shape)
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

/// Reads a model from `path`.
pub fn load(path: &Path) -> Result<IntegerModel, FormatError> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
        path: path.display().to_string(),
        source,
    })?;
    from_bytes(&bytes)
}
