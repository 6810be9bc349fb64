//! The integer model file: a versioned header, a checksum, and the model encoded with
//! `postcard` (int8 weights one byte each, integers as varints).
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `BQATINT8` |
//! | 4 | format version, little-endian ([`VERSION`], 3: the integer model as a graph of nodes) |
//! | 8 | payload length, little-endian |
//! | 4 | CRC-32 of the payload |
//! | n | payload: the model's `postcard` encoding |
//!
//! Loading checks every field before use ([`IntegerModel::validate`]): a truncated,
//! corrupted, foreign or inconsistent file is an error, never a panic, and so is a model whose
//! work or memory is above the [`Budget`] ([`load`] and [`from_bytes`] use
//! [`Budget::DEFAULT`]; [`load_with_budget`] and [`from_bytes_with_budget`] take another, which
//! the loaded model keeps for its `forward`). While decoding, nothing is allocated beyond the
//! decoded nodes, whose count is checked against the budget first. The model is written to
//! a temporary file and renamed, so a failed save leaves no partial file.
//!
//! # Compatibility
//!
//! **A reader loads every version that was ever written**, and computes with it what the
//! writer's runtime computed. Writers write [`VERSION`] only.
//!
//! - **What a version number is**: the meaning of the payload's bytes. The payload is the
//!   `postcard` encoding of [`IntegerModel`] (its nodes and outputs; the weight cache and the
//!   budget are not saved), so the version names the serde layout of every type inside it and
//!   the arithmetic each op means.
//! - **What bumps it**: a change to the bytes of what existing files hold or to what they
//!   compute: a field added, removed, renamed into another type or reordered in a saved struct
//!   or variant; a variant reordered or removed; a type changed (`u32` to `u64`); an op whose
//!   results change for the same data (other rounding, other clamping). The header's layout
//!   itself changes only with the magic.
//! - **What does not**: a new op. `postcard` encodes an enum variant by its index, so a new
//!   [`IntOp`](crate::model::IntOp) (or [`Output`](crate::model::Output), [`Dim`](crate::model::Dim)) variant is
//!   **appended at the end**: old files keep their indices and read as before. Variants are
//!   never reordered or removed (version 1 shows why: a variant inserted in the middle gave one
//!   number two layouts, see below). A file using the new op is refused by older readers (an
//!   unknown variant index is an error naming the payload, not a misreading). Neither do a new
//!   check, a faster kernel computing the same integers, or documentation.
//! - **A newer version is refused**, with [`FormatError::Newer`] naming the file's version and
//!   the newest this build reads: use the build that wrote it, or a newer burn-qat.
//! - **Old versions are upgraded, one function per version**: a version's payload types are
//!   frozen in a module of their own (`format/v2.rs`: private serde types that are never
//!   edited) with an upgrade to the next version, and loading runs the chain up to the current
//!   model, then validates it as any file. Version 3 (`format/v3.rs`, `v3 -> v4`) differs from
//!   version 4 in the model's ends only (one `output`), so it shares the current node types,
//!   whose variants are only ever appended.
//! - **Golden files** (`crates/burn-qat-runtime/golden/`, test `tests/golden.rs`) pin the bytes:
//!   one small model per kind of op written as the current version, and files the old writers
//!   of versions 1 and 2 wrote, each with an input and the output it must give, value for
//!   value. A change that alters a golden file's bytes or its output is a format change: it
//!   needs a new version and an upgrade, never a re-blessed file.
//!
//! | version | written by | payload | read as |
//! |---|---|---|---|
//! | 1 | commits 0c9cfa4..03ffdeb | `{ input_shape, layers }`: a list of layers (quantize, conv, linear, max/avg pool, clamp, flatten, residual block), 8-bit weights | `v1 -> v2 -> current` |
//! | 2 | commits 0d01961..c068d46 | version 1 plus `weight_bits` on conv and linear (sub-8-bit weights) | `v2 -> current` |
//! | 3 | commits 1071085..8041836 | `{ nodes, output }`: a graph of [`IntNode`](crate::model::IntNode)s, one input, one output | `v3 -> current` |
//! | 4 | commits after 8041836 | [`IntegerModel`]: version 3's nodes, several inputs (the leading `Input` nodes) and `outputs` | itself |
//!
//! A version 1 or 2 model becomes a chain of nodes named by their old place (`layers.2`,
//! `layers.2.body.0`, `layers.2.add`): a clamp becomes a 256-entry table, a flatten a reshape,
//! a residual block its body's nodes and an add of the block's input and the body's output.
//! Version 1 has two layer orders (commit 2ae457e inserted average pooling before the clamp):
//! a version 1 file is decoded in both and the order in which it decodes completely into a
//! valid model is kept; a file valid in both with different meanings is refused as ambiguous.
//! Versions 1 and 2 averaged pooling windows with an exact division; the runner's fixed-point
//! `1 / count` can round an exact tie differently when the count is even but not a power of two
//! (2x3 windows), the one known difference.
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
//!
//! // A file of a newer version is refused, naming both versions.
//! let mut newer = bytes.clone();
//! newer[8..12].copy_from_slice(&(format::VERSION + 1).to_le_bytes());
//! let err = format::from_bytes(&newer).unwrap_err();
//! assert!(matches!(err, format::FormatError::Newer { found: 5, supported: 4 }));
//! assert!(err.to_string().contains("version 5") && err.to_string().contains("version 4"));
//! ```

use std::path::Path;

use thiserror::Error;

use crate::budget::{self, Budget};
use crate::model::IntegerModel;

mod v1;
mod v2;
mod v3;

/// File magic.
pub const MAGIC: &[u8; 8] = b"BQATINT8";
/// Current format version: what [`to_bytes`] and [`save`] write. Every version from
/// [`OLDEST_VERSION`] to this one is read.
pub const VERSION: u32 = 4;
/// The oldest format version, read by every build.
pub const OLDEST_VERSION: u32 = 1;
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
    /// A version number no build ever wrote (0).
    #[error(
        "integer model format version {found} was never written: versions {OLDEST_VERSION} to \
         {VERSION} exist (the file is damaged or not a burn-qat integer model)"
    )]
    Version {
        /// The file's version.
        found: u32,
    },
    /// A newer format version than this build reads.
    #[error(
        "integer model format version {found} is newer than the newest this build reads, \
         version {supported} (it reads versions {OLDEST_VERSION} to {supported}): load it with a \
         newer burn-qat or with the build that wrote it"
    )]
    Newer {
        /// The file's version.
        found: u32,
        /// The newest version this build reads ([`VERSION`]).
        supported: u32,
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
    if version > VERSION {
        return Err(FormatError::Newer {
            found: version,
            supported: VERSION,
        });
    }
    if version < OLDEST_VERSION {
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
    match version {
        1 => from_v1(payload, budget),
        2 => {
            let old = v2::decode(payload).map_err(|e| legacy(2, e))?;
            checked(v2::upgrade(old).map_err(|e| legacy(2, e))?, budget)
        }
        3 => {
            let old = from_graph::<v3::IntegerModel3>(payload, budget, 3)?;
            checked(v3::upgrade(old), budget)
        }
        _ => checked(
            from_graph::<IntegerModel>(payload, budget, VERSION)?,
            budget,
        ),
    }
}

/// An error in a version 1 or 2 payload or its upgrade.
fn legacy(version: u32, e: String) -> FormatError {
    FormatError::Invalid(format!("version {version} payload: {e}"))
}

/// The upgraded model, validated against `budget`.
fn checked(model: IntegerModel, budget: Budget) -> Result<IntegerModel, FormatError> {
    let model = model.with_budget(budget);
    model
        .validate()
        .map_err(|e| FormatError::Invalid(e.to_string()))?;
    Ok(model)
}

/// A version 1 payload, in whichever of version 1's two layer orders it is valid (see
/// [`v1`]). Old payloads have no node count to check first: their layers are at most as many
/// as the payload's bytes, and the budget is checked on the upgraded model.
fn from_v1(payload: &[u8], budget: Budget) -> Result<IntegerModel, FormatError> {
    let read = |model: Result<v2::IntegerModel2, String>| -> Result<IntegerModel, String> {
        let model = v2::upgrade(model?)?.with_budget(budget);
        model.validate().map_err(|e| e.to_string())?;
        Ok(model)
    };
    let late = read(v2::decode::<v1::IntegerModel1<v1::LateLayer>>(payload).map(v1::upgrade));
    let early = read(v2::decode::<v1::IntegerModel1<v1::EarlyLayer>>(payload).map(v1::upgrade));
    match (late, early) {
        (Ok(a), Ok(b)) if a != b => Err(legacy(
            1,
            "the file is valid in both of version 1's layer orders (commits 0c9cfa4..4ee6218 \
             and 2ae457e..03ffdeb) with different meanings: refused rather than guessed; \
             convert the QAT model again with this build"
                .into(),
        )),
        (Ok(model), _) | (_, Ok(model)) => Ok(model),
        (Err(e), Err(_)) => Err(legacy(1, e)),
    }
}

/// A payload of a version that encodes a graph of nodes (3 on), decoded as `T`.
fn from_graph<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    budget: Budget,
    version: u32,
) -> Result<T, FormatError> {
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
    let (model, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|e| FormatError::Invalid(format!("payload: {e}")))?;
    if !rest.is_empty() {
        // The checksum covers them, so they were written: by a writer this reader does not know.
        return Err(FormatError::Invalid(format!(
            "payload: {} bytes after the model (a version {version} model is the whole payload)",
            rest.len()
        )));
    }
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
