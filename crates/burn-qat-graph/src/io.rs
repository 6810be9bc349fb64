//! What a traced forward takes and returns: one float tensor, or a tuple of them.

use burn::backend::capture::TensorId;
use burn::prelude::*;
use burn::tensor::DispatchTensor;

/// One float tensor a traced forward takes or returns (batch first).
pub trait GraphTensor: Sized {
    /// Its rank.
    const RANK: usize;
    /// Its shape.
    fn shape_vec(&self) -> Vec<usize>;
    /// Burn's primitive.
    fn into_part(self) -> DispatchTensor;
    /// From Burn's primitive (of rank [`RANK`](Self::RANK)).
    fn from_part(part: DispatchTensor) -> Self;
    /// Its id on the capture backend.
    fn capture_id(&self) -> Result<TensorId, String>;
    /// Zeros of shape `dims` (of length [`RANK`](Self::RANK)) on `device`.
    fn zeros(dims: &[usize], device: &Device) -> Self;
}

impl<const D: usize> GraphTensor for Tensor<D> {
    const RANK: usize = D;
    fn shape_vec(&self) -> Vec<usize> {
        self.dims().to_vec()
    }
    fn into_part(self) -> DispatchTensor {
        self.into_dispatch()
    }
    fn from_part(part: DispatchTensor) -> Self {
        Tensor::from_dispatch(part)
    }
    fn capture_id(&self) -> Result<TensorId, String> {
        crate::capture::tensor_id(self)
    }
    fn zeros(dims: &[usize], device: &Device) -> Self {
        Tensor::from_data(TensorData::zeros::<f32, _>(dims.to_vec()), device)
    }
}

/// The tensors a traced forward takes (its arguments after the model) or returns: one float
/// tensor `Tensor<D>`, or a tuple of two to four (`(Tensor<4>, Tensor<2>)`), in order. Graph
/// mode's [`trace_many`](crate::trace_many), `prepare_many` and
/// [`QatGraph::forward_many`](crate::QatGraph::forward_many) take and give these.
///
/// ```
/// use burn::prelude::*;
/// use burn_qat_graph::GraphIo;
///
/// assert_eq!(<(Tensor<4>, Tensor<2>)>::ranks(), [4, 2]);
/// assert_eq!(<Tensor<3>>::ranks(), [3]);
/// ```
pub trait GraphIo: Sized {
    /// The rank of each tensor, in order.
    fn ranks() -> Vec<usize>;
    /// The shape of each tensor, in order.
    fn shapes(&self) -> Vec<Vec<usize>>;
    /// The tensors as Burn's primitives, in order.
    fn into_parts(self) -> Vec<DispatchTensor>;
    /// The tensors from Burn's primitives (as many as [`ranks`](Self::ranks), of those ranks).
    fn from_parts(parts: Vec<DispatchTensor>) -> Self;
    /// Their ids on the capture backend, in order.
    fn capture_ids(&self) -> Result<Vec<TensorId>, String>;
    /// Zeros of shapes `dims` (one per tensor, of [`ranks`](Self::ranks)) on `device`.
    fn zeros(dims: &[Vec<usize>], device: &Device) -> Self;
}

impl<const D: usize> GraphIo for Tensor<D> {
    fn ranks() -> Vec<usize> {
        vec![D]
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape_vec()]
    }
    fn into_parts(self) -> Vec<DispatchTensor> {
        vec![self.into_part()]
    }
    fn from_parts(parts: Vec<DispatchTensor>) -> Self {
        let [x] = <[DispatchTensor; 1]>::try_from(parts).expect("one tensor");
        Self::from_part(x)
    }
    fn capture_ids(&self) -> Result<Vec<TensorId>, String> {
        Ok(vec![self.capture_id()?])
    }
    fn zeros(dims: &[Vec<usize>], device: &Device) -> Self {
        <Self as GraphTensor>::zeros(&dims[0], device)
    }
}

macro_rules! tuple_io {
    ($n:literal: $($t:ident $v:ident),+) => {
        impl<$($t: GraphTensor),+> GraphIo for ($($t,)+) {
            fn ranks() -> Vec<usize> {
                vec![$($t::RANK),+]
            }
            fn shapes(&self) -> Vec<Vec<usize>> {
                let ($($v,)+) = self;
                vec![$($v.shape_vec()),+]
            }
            fn into_parts(self) -> Vec<DispatchTensor> {
                let ($($v,)+) = self;
                vec![$($v.into_part()),+]
            }
            fn from_parts(parts: Vec<DispatchTensor>) -> Self {
                let [$($v),+] = <[DispatchTensor; $n]>::try_from(parts)
                    .unwrap_or_else(|p| panic!("{} tensors, not {}", $n, p.len()));
                ($($t::from_part($v),)+)
            }
            fn capture_ids(&self) -> Result<Vec<TensorId>, String> {
                let ($($v,)+) = self;
                Ok(vec![$($v.capture_id()?),+])
            }
            fn zeros(dims: &[Vec<usize>], device: &Device) -> Self {
                let mut k = 0..;
                ($($t::zeros(&dims[k.next().expect("endless")], device),)+)
            }
        }
    };
}

tuple_io!(2: A a, B b);
tuple_io!(3: A a, B b, C c);
tuple_io!(4: A a, B b, C c, E e);
