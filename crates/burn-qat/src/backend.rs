//! Backends chosen at run time among those compiled in by cargo features.
//!
//! Burn 0.22 selects the backend through a [`Device`] value; cargo features (`flex`,
//! `ndarray`, `wgpu`) only decide which backends exist in the binary. These helpers name them.
//!
//! ```
//! let names = burn_qat::backend::enabled();
//! assert!(names.contains(&"flex")); // the default feature
//! let device = burn_qat::backend::device("flex").unwrap();
//! let err = burn_qat::backend::device("tpu").unwrap_err();
//! assert!(err.to_string().contains("`device` is \"tpu\""));
//! ```

use burn::prelude::*;

use crate::QatError;

/// Names of the backends compiled into this binary, in the order `flex`, `ndarray`, `wgpu`.
pub fn enabled() -> Vec<&'static str> {
    [
        cfg!(feature = "flex").then_some("flex"),
        cfg!(feature = "ndarray").then_some("ndarray"),
        cfg!(feature = "wgpu").then_some("wgpu"),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The device of the backend called `name` (`flex`, `ndarray` or `wgpu`), or an error that
/// lists the compiled-in backends.
pub fn device(name: &str) -> Result<Device, QatError> {
    match name {
        #[cfg(feature = "flex")]
        "flex" => Ok(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Ok(Device::ndarray()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        _ => Err(QatError::InvalidConfig {
            field: "device".into(),
            value: format!("{name:?}"),
            allowed: format!(
                "one of the backends compiled in: {:?} (enable more with the cargo features flex, ndarray, wgpu)",
                enabled()
            ),
        }),
    }
}

/// The device named by the `BURN_DEVICE` environment variable if set, else the first enabled
/// backend (`flex` by default).
///
/// # Panics
///
/// If no backend feature is enabled, or `BURN_DEVICE` names a backend that is not compiled in.
pub fn default_device() -> Device {
    let name = std::env::var("BURN_DEVICE")
        .ok()
        .unwrap_or_else(|| enabled().first().copied().unwrap_or("none").to_string());
    device(&name).unwrap_or_else(|err| panic!("{err}"))
}
