//! `report.json`: the run's settings and results.

use serde::{Deserialize, Serialize};

use crate::model::ModelKind;

/// Everything a run reports. Accuracies are fractions in `[0, 1]`; `int8_*` come from the real
/// integer model (`burn_qat::export`), also written as `model.bqi`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// `mnist`, or `mnist (quick subset)`.
    pub dataset: String,
    /// The model.
    pub model: ModelKind,
    /// The backend.
    pub device: String,
    /// The seed.
    pub seed: u64,
    /// Float training epochs.
    pub epochs_float: usize,
    /// QAT epochs.
    pub epochs_qat: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Training images used.
    pub train_images: usize,
    /// Test images used.
    pub test_images: usize,
    /// Weight bits.
    pub weight_bits: u32,
    /// Activation bits.
    pub activation_bits: u32,
    /// Float model test accuracy.
    pub float_test_acc: f64,
    /// QAT (fake-quant) model test accuracy, evaluation mode.
    pub qat_test_acc: f64,
    /// Accuracy of the QAT model folded for inference (BatchNorm folded, quantized weights baked).
    pub folded_test_acc: f64,
    /// Integer model (int8 arithmetic) test accuracy.
    pub int8_test_acc: Option<f64>,
    /// Float parameters in bytes (f32).
    pub float_size_bytes: usize,
    /// Integer model file size in bytes.
    pub int8_size_bytes: Option<usize>,
    /// Float training throughput.
    pub train_images_per_s_float: f64,
    /// QAT training throughput.
    pub train_images_per_s_qat: f64,
    /// tfmot's QAT accuracy for this model and schedule (for comparison), if measured.
    pub tfmot_qat_test_acc: Option<f64>,
}
