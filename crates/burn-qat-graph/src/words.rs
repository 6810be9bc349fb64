//! Burn's recorded ops in the words a user wrote them (`Tensor::select`,
//! `module::max_pool2d(ceil_mode)`), for refusals: never an IR `Debug` string.

use std::fmt::Debug;

use burn::backend::ir::{ModuleOperationIr, NumericOperationIr, OperationIr};

/// The name of an enum value's variant, from its `Debug` form (`Select(SelectOpIr {..})` ->
/// `Select`).
fn variant(x: &impl Debug) -> String {
    let s = format!("{x:?}");
    s.split(['(', ' ', '{', ','])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `MaxPool2d` -> `max_pool2d`, `SwapDims` -> `swap_dims`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A tensor method's name where Burn's differs from its recorded op's (`IntoInt` is
/// `Tensor::int`, `ArgMax` is `Tensor::argmax`).
fn method(variant: &str) -> String {
    match variant {
        "IntoInt" => "int".into(),
        "IntoFloat" => "float".into(),
        "ArgMax" => "argmax".into(),
        "ArgMin" => "argmin".into(),
        "ArgSort" => "argsort".into(),
        "ArgTopK" => "argtopk".into(),
        "TopK" => "topk".into(),
        "TopKWithIndices" => "topk_with_indices".into(),
        "CumSum" => "cumsum".into(),
        "CumProd" => "cumprod".into(),
        "CumMin" => "cummin".into(),
        "CumMax" => "cummax".into(),
        "ArcCos" => "acos".into(),
        "ArcCosh" => "acosh".into(),
        "ArcSin" => "asin".into(),
        "ArcSinh" => "asinh".into(),
        "ArcTan" => "atan".into(),
        "ArcTanh" => "atanh".into(),
        "ArcTan2" => "atan2".into(),
        "Lower" => "lower".into(),
        other => snake(other),
    }
}

/// The arithmetic operators, for ops on two tensors.
fn operator(variant: &str) -> Option<&'static str> {
    Some(match variant {
        "Add" => "+",
        "Sub" => "-",
        "Mul" => "*",
        "Div" => "/",
        "Rem" => "%",
        _ => return None,
    })
}

/// What a module op was called with, where it decides whether graph mode can take it.
fn module_detail(op: &ModuleOperationIr) -> String {
    match op {
        ModuleOperationIr::MaxPool1d(p) if p.ceil_mode => "(ceil_mode)".into(),
        ModuleOperationIr::MaxPool2d(p) if p.ceil_mode => "(ceil_mode)".into(),
        ModuleOperationIr::AvgPool1d(p) if p.ceil_mode => "(ceil_mode)".into(),
        ModuleOperationIr::AvgPool2d(p) if p.ceil_mode => "(ceil_mode)".into(),
        ModuleOperationIr::Interpolate(p) => format!("(mode {:?})", p.options.mode),
        _ => String::new(),
    }
}

/// The Burn call a recorded op comes from, in backticks: `` `Tensor::select` ``,
/// `` `a / b` (`Tensor::div`) ``, `` `module::interpolate(mode Nearest)` ``,
/// `` `activation::softmax` ``.
pub(crate) fn op_words(op: &OperationIr) -> String {
    let tensor = |v: String| {
        let m = method(&v);
        match operator(&v) {
            Some(o) => format!("`a {o} b` (`Tensor::{m}` of two tensors)"),
            None => format!("`Tensor::{m}`"),
        }
    };
    match op {
        OperationIr::BaseFloat(x) | OperationIr::BaseInt(x) | OperationIr::BaseBool(x) => {
            tensor(variant(x))
        }
        OperationIr::NumericFloat(_, x) | OperationIr::NumericInt(_, x) => {
            if let NumericOperationIr::Clamp(_) = x {
                return "`Tensor::clamp`".into();
            }
            tensor(variant(x))
        }
        OperationIr::Float(_, x) => tensor(variant(x)),
        OperationIr::Int(x) => tensor(variant(x)),
        OperationIr::Bool(x) => tensor(variant(x)),
        OperationIr::Module(x) => {
            format!("`module::{}{}`", method(&variant(x)), module_detail(x))
        }
        OperationIr::Activation(x) => format!("`activation::{}`", method(&variant(x))),
        OperationIr::Custom(c) => format!("the custom op `{}`", c.id),
        OperationIr::Init(_) => "a tensor made in the forward (`Tensor::from_data`)".into(),
        OperationIr::Drop(_) => "a dropped tensor".into(),
        OperationIr::Distributed(x) => format!("the distributed op `{}`", snake(&variant(x))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_like_burn_calls() {
        assert_eq!(snake("MaxPool2d"), "max_pool2d");
        assert_eq!(snake("AdaptiveAvgPool2d"), "adaptive_avg_pool2d");
        assert_eq!(snake("SwapDims"), "swap_dims");
        assert_eq!(method("IntoInt"), "int");
        assert_eq!(method("MaskWhere"), "mask_where");
        assert_eq!(variant(&Some(3)), "Some");
    }
}
