//! # burn-qat-core
//!
//! The bottom layer of burn-qat: pure quantization math, with no Burn modules and no state.
//!
//! - [`QuantSpec`]: what integer grid a tensor is fake-quantized to (bits, signedness,
//!   symmetric or asymmetric, narrow range, per-tensor or per-channel, rounding).
//! - [`QParams`] and [`qparams_from_range`]: the affine map `real = scale * (q - zero_point)`
//!   chosen for an observed `[min, max]` range.
//! - [`reference`](mod@reference): slow scalar quantize / dequantize / fake-quant, the oracle every tensor path
//!   is tested against.
//! - [`tensor`]: the same operations on Burn tensors, with the clipped straight-through
//!   estimator (gradient 1 inside the representable range, 0 outside).
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat_core::{QuantSpec, qparams_from_range, reference, tensor};
//!
//! let spec = QuantSpec::int8_act_per_tensor_asymmetric();
//! let qp = qparams_from_range(-1.0, 3.0, &spec);
//! assert_eq!(qp.zero_point, -64);                   // real 0.0 is exactly q = -64
//! assert!((qp.scale - 4.0 / 255.0).abs() < 1e-9);   // (max - min) / (qmax - qmin)
//!
//! let device = Device::flex();
//! let x = Tensor::<1>::from_floats([0.5, 10.0], &device);
//! let y = tensor::fake_quant_per_tensor(x, qp, &spec);
//! let y: Vec<f32> = y.into_data().try_to_vec().unwrap();
//! assert_eq!(y[0], reference::fake_quant(0.5, qp, &spec));
//! assert_eq!(y[1], reference::fake_quant(10.0, qp, &spec)); // clipped to the top of the grid
//! ```
#![warn(missing_docs)]

mod error;
mod qparams;
// burn-ndarray is deprecated upstream but still a backend users pick: its kernels stay.
#[allow(deprecated)]
pub mod fused;
pub mod reference;
mod spec;
pub mod tensor;

pub use error::QatError;
pub use qparams::{MIN_SCALE, QParams, ema, qparams_from_range};
pub use spec::{Granularity, QuantSpec, RoundingMode};
