//! Test support: the backends to run on, chosen at run time.
//!
//! Every test loops over [`backends`]: all backends compiled in (cargo features `flex`,
//! `ndarray`, `wgpu`), or those listed in `BURN_QAT_TEST_BACKENDS` (comma separated). A case a
//! backend cannot run is reported with [`skip`], never silently passed.

use burn::prelude::*;

/// A backend under test.
#[derive(Clone, Debug)]
pub struct Backend {
    /// `flex`, `ndarray` or `wgpu`.
    pub name: &'static str,
    /// Its device (without autodiff).
    pub device: Device,
}

/// The backends to test on.
///
/// # Panics
///
/// If `BURN_QAT_TEST_BACKENDS` names a backend that is not compiled in, or selects none.
pub fn backends() -> Vec<Backend> {
    let enabled = burn_qat::backend::enabled();
    let wanted: Vec<String> = match std::env::var("BURN_QAT_TEST_BACKENDS") {
        Ok(list) if !list.trim().is_empty() => {
            list.split(',').map(|s| s.trim().to_string()).collect()
        }
        _ => enabled.iter().map(|s| s.to_string()).collect(),
    };
    let out: Vec<Backend> = wanted
        .iter()
        .map(|name| {
            let name = enabled
                .iter()
                .find(|e| **e == name.as_str())
                .unwrap_or_else(|| {
                    panic!("BURN_QAT_TEST_BACKENDS names {name:?}, compiled in: {enabled:?}")
                });
            Backend {
                name,
                device: burn_qat::backend::device(name).unwrap(),
            }
        })
        .collect();
    assert!(!out.is_empty(), "no backend selected");
    out
}

/// Reports a case that `backend` cannot run, with the reason. Shown by `cargo test -- --nocapture`
/// and counted in the test's output.
pub fn skip(test: &str, backend: &str, reason: &str) {
    eprintln!("SKIPPED {test} on {backend}: {reason}");
}

/// The values of a float tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float data")
}

/// Proptest cases per backend: fewer on wgpu (a software Vulkan driver in CI).
pub fn cases(backend: &Backend, cpu: u32) -> u32 {
    if backend.name == "wgpu" {
        (cpu / 4).max(8)
    } else {
        cpu
    }
}

/// A deterministic stream of values in `[-1, 1)` (a 64-bit LCG): test data that is the same on
/// every run and machine.
pub fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}
