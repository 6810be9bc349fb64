//! Loading records into a quantized model, checked: a record saved from a model quantized one
//! way is refused by a model quantized another way.
//!
//! Burn's `load_record` writes whatever the record holds; a record with 8-bit weight
//! quantizers loaded into a model built with a 4-bit configuration would run at 4 bits with
//! 8-bit ranges, silently. These functions compare every quantizer's recorded spec with the
//! model's own before giving the loaded model back.
//!
//! Save with Burn (`model.valid().save_file(path)` or `into_record().save(path)`), then to load:
//! build the model again with the same configuration (the skeleton), and load into it:
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat_core::QuantSpec;
//! use burn_qat_nn::{FakeQuantConfig, record};
//!
//! let device = Device::flex().autodiff();
//! let fq = FakeQuantConfig::new(QuantSpec::default()).init(&device).unwrap();
//! fq.forward(Tensor::<1>::from_floats([-1.0, 3.0], &device));
//! let saved = fq.valid().into_record();
//!
//! // The same configuration: loads, with the observed range.
//! let skeleton = FakeQuantConfig::new(QuantSpec::default()).init(&device).unwrap();
//! let loaded = record::load_record(skeleton, saved.clone()).unwrap();
//! assert_eq!(loaded.observed_range(), Some((vec![-1.0], vec![3.0])));
//!
//! // Another configuration (4 bits): refused, naming both specs.
//! let other = FakeQuantConfig::new(QuantSpec::default().with_bits(4)).init(&device).unwrap();
//! let err = record::load_record(other, saved).unwrap_err();
//! assert!(err.to_string().contains("8-bit"), "{err}");
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::store::ModuleRecord;
use burn_qat_core::QatError;

use crate::tree;

/// Loads `record` into `model` and checks that every quantizer's recorded spec equals the
/// model's. `model` must be built with the configuration the record was saved with. The loaded
/// model has state of its own: clones of `model` keep theirs, Burn's `BatchNorm` statistics
/// included (Burn's own `load_record` writes those through to every clone).
///
/// The recorded state must also be what a quantizer can hold: finite ranges and learned
/// parameters, and observed (or frozen) ranges that contain 0 (`min <= 0 <= max` per channel,
/// as every observer records them).
///
/// # Errors
///
/// [`QatError::Record`] if Burn refuses the record (missing or extra tensors, shapes), or if a
/// quantizer holds a NaN or infinite range or learned parameter, or a recorded `min` above 0 or
/// `max` below 0 (naming the quantizer, the field and the value);
/// [`QatError::RecordMismatch`] naming the first quantizer whose recorded spec differs from
/// the model's, with both specs.
pub fn load_record<M: Module>(model: M, record: ModuleRecord) -> Result<M, QatError> {
    let expected: BTreeMap<String, _> = tree::quantizers(&model)
        .into_iter()
        .map(|q| (q.path, q.spec))
        .collect();
    // State cells of its own first: Burn's `RunningState` (BatchNorm statistics) is written in
    // place by a load, and would reach every clone of `model`.
    let loaded = tree::own_state(model)
        .try_load_record(record)
        .map_err(|e| QatError::Record {
            reason: e.to_string(),
        })?;
    for q in tree::quantizers(&loaded) {
        check_state(&q)?;
        let Some(want) = expected.get(&q.path) else {
            continue;
        };
        if q.spec != *want {
            let show = |s: &Option<burn_qat_core::QuantSpec>| {
                s.map_or("no valid spec".to_string(), |s| s.to_string())
            };
            return Err(QatError::RecordMismatch {
                layer: q.path,
                recorded: show(&q.spec),
                model: show(want),
            });
        }
    }
    Ok(loaded)
}

/// Refuses recorded state no quantizer can hold: NaN or infinite ranges and learned
/// parameters, a range `min` above 0 or `max` below 0.
fn check_state(q: &tree::QuantizerState) -> Result<(), QatError> {
    let refuse = |field: &str, channel: usize, v: f32, rule: &str| QatError::Record {
        reason: format!(
            "quantizer `{}` holds {v:?} in `{field}` (channel {channel}): {rule}",
            q.path
        ),
    };
    // A learned quantizer's observed range lives in its observer.
    let prefix = if q.kind == tree::QuantizerKind::Learned {
        format!("{}.", crate::LearnedFakeQuant::OBSERVER)
    } else {
        String::new()
    };
    if let Some((lo, hi)) = &q.range {
        let bounds = [
            (crate::FakeQuant::MIN, lo, "min is always <= 0"),
            (crate::FakeQuant::MAX, hi, "max is always >= 0"),
        ];
        for (name, values, rule) in bounds {
            let field = format!("{prefix}{name}");
            for (c, &v) in values.iter().enumerate() {
                if !v.is_finite() {
                    return Err(refuse(&field, c, v, "a recorded range must be finite"));
                }
                let outside = if name == crate::FakeQuant::MIN {
                    v > 0.0
                } else {
                    v < 0.0
                };
                if outside {
                    let rule = format!("a recorded range's {rule} (observed ranges contain 0)");
                    return Err(refuse(&field, c, v, &rule));
                }
            }
        }
    }
    for (field, values) in &q.learned {
        if let Some((c, &v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(refuse(
                field,
                c,
                v,
                "a recorded learned parameter must be finite",
            ));
        }
    }
    Ok(())
}

/// [`load_record`] from a file Burn saved (`module.save_file(path)`, a burnpack `.bpk`).
///
/// # Errors
///
/// Those of [`load_record`], and [`QatError::Record`] naming the path if it cannot be read.
pub fn load_file<M: Module>(model: M, path: impl AsRef<Path>) -> Result<M, QatError> {
    let path = path.as_ref();
    let record = ModuleRecord::load(path).map_err(|e| QatError::Record {
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    load_record(model, record)
}
