#!/bin/sh
# Rebuilds the scratch workspace that wrote the version 1 and 2 golden files with the old
# writers, and runs it: `sh setup.sh /tmp/bqat-old` (then compare its out/ with golden/).
# old_v1a = 4ee6218 (first v1 layer order), old_v1b = 03ffdeb (last v1), old_v2 = c068d46 (last v2):
# model.rs, format.rs, requant.rs verbatim; kernels.rs without its rten-gemm fast paths
# (tested equal to the reference kernels that replace them); burn-qat-core reduced to
# QParams, the int8 activation spec and `reference` of c068d46.
set -e
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
dst=${1:-/tmp/bqat-old}
mkdir -p "$dst/core/src" "$dst/gen/src"
cd "$dst"
printf '[workspace]\nresolver = "2"\nmembers = ["core", "old_v1a", "old_v1b", "old_v2", "gen"]\n[workspace.package]\nversion = "0.1.0"\nedition = "2024"\n' > Cargo.toml
printf '[package]\nname = "burn-qat-core"\nversion.workspace = true\nedition.workspace = true\n' > core/Cargo.toml
{
  printf '#![allow(missing_docs, dead_code)]\n#[derive(Clone, Copy, Debug, PartialEq)]\npub struct QParams { pub scale: f32, pub zero_point: i32 }\n'
  printf '#[derive(Clone, Copy, Debug, PartialEq)]\npub enum RoundingMode { HalfToEven, TfHalfUp }\n'
  printf 'pub struct QuantSpec { pub bits: u32, pub signed: bool, pub narrow_range: bool, pub rounding: RoundingMode }\nimpl QuantSpec {\n'
  printf '    pub fn int8_act_per_tensor_asymmetric() -> Self { Self { bits: 8, signed: true, narrow_range: false, rounding: RoundingMode::HalfToEven } }\n'
  git -C "$repo" show c068d46:crates/burn-qat-core/src/spec.rs | sed -n '187,208p'
  printf '}\npub mod reference {\n'
  git -C "$repo" show c068d46:crates/burn-qat-core/src/reference.rs | sed -n '/^use crate/,$p' | awk '/^\/\/\/ Quantize then dequantize/{exit} /^pub fn fake_quant\(/{exit} {print}'
  printf '}\n'
} > core/src/lib.rs
for p in v1a:4ee6218 v1b:03ffdeb v2:c068d46; do
  n=${p%%:*}; c=${p##*:}
  mkdir -p old_$n/src
  for f in model format requant kernels; do git -C "$repo" show $c:crates/burn-qat-export/src/$f.rs > old_$n/src/$f.rs; done
  printf '[package]\nname = "old_%s"\nversion.workspace = true\nedition.workspace = true\n[dependencies]\nburn-qat-core = { path = "../core" }\nthiserror = "2"\nrayon = "1.12"\nserde = { version = "1", features = ["derive"] }\npostcard = { version = "1", default-features = false, features = ["use-std"] }\ncrc32fast = "1"\n' $n > old_$n/Cargo.toml
  printf '#![allow(missing_docs, dead_code, unused_imports)]\npub mod format;\nmod kernels;\npub mod model;\npub mod requant;\npub use model::*;\n' > old_$n/src/lib.rs
done
python3 "$here/strip.py" old_v1a/src/kernels.rs rten_gemm rten_tensor gemm_u8_i8 conv2d linear
python3 "$here/strip.py" old_v1b/src/kernels.rs rayon rten_gemm rten_tensor with_gemm Packed conv2d ConvPlan linear
python3 "$here/strip.py" old_v2/src/kernels.rs rayon rten_gemm rten_tensor with_gemm Packed conv2d ConvPlan linear
for n in v1a v1b v2; do printf '\npub use self::conv2d_reference as conv2d;\npub use self::linear_reference as linear;\n' >> old_$n/src/kernels.rs; done
printf 'pub enum Packed {}\n' >> old_v1b/src/kernels.rs
printf 'pub enum Packed {}\n' >> old_v2/src/kernels.rs
printf '[package]\nname = "gen"\nversion.workspace = true\nedition.workspace = true\n[dependencies]\nold_v1a = { path = "../old_v1a" }\nold_v1b = { path = "../old_v1b" }\nold_v2 = { path = "../old_v2" }\nserde_json = "1"\n' > gen/Cargo.toml
cp "$here/gen.rs" gen/src/main.rs
CARGO_TARGET_DIR="$dst/target" cargo run -q -p gen -- "$dst/out"
