//! # burn-qat-onnx
//!
//! Exports a burn-qat integer model to ONNX in QDQ form, the form onnxruntime, TensorRT and
//! tract turn into int8 kernels: `QuantizeLinear`/`DequantizeLinear` pairs with the trained
//! scale and zero point on every activation edge, int8 weights dequantized per output channel
//! (`Conv` axis 0; `Linear` written as `Gemm` with its `[d_input, d_output]` weight as `B`,
//! axis 1), int32 biases with scale `s_in * s_w`, and equal quantization parameters across
//! shape-only operators (`MaxPool`, `Flatten`) and `AveragePool` (TFLite's convention).
//!
//! The protobuf types in [`proto`] are generated with prost from the official `onnx.proto`
//! (`crates/burn-qat-onnx/proto/onnx.proto`, from the `onnx` 1.23.2 package):
//! regenerate with `cargo run --manifest-path tools/onnx-proto-gen/Cargo.toml` (protox +
//! prost-build; no `protoc` needed).
//!
//! The model's input is `input`, float32 `[N, ..input_shape]`; its output is `logits`.
#![warn(missing_docs)]

#[allow(missing_docs)]
pub mod proto;
mod writer;

pub use writer::{OnnxError, OnnxOptions, decode_model, save, to_model_proto};
