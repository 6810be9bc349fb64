//! The burn-qat MNIST example as a library: data loading, models, training and the report. The
//! binary (`src/main.rs`) is a thin command line over it.
#![warn(missing_docs)]

pub mod data;
