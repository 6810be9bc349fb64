//! The instruction sets the integer kernels run on, chosen once per process: the one place that
//! asks the CPU what it has ([`Cpu`], detected once), the choice ([`isa`](fn@isa): the best the
//! CPU runs, or the `BURN_QAT_ISA` environment variable, read once), and the switches tests and
//! benchmarks use ([`set_isa`], [`force_isa`]). Every kernel family (the GEMM on words and its
//! packing helpers, the direct depthwise kernel, requantization, the AVX2 loops of `ops`) asks
//! [`isa`](fn@isa) which implementation to run; every implementation gives the same bits.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The environment variable that picks the instruction set: one of [`Isa::name`] (or `auto`,
/// the run-time choice).
pub const ISA_VAR: &str = "BURN_QAT_ISA";

/// An instruction set the integer kernels run on. All of them compute the same bits: the
/// products are exact in `i32` (wrapping as `vpdpbusd` does), whatever the instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// x86-64 AVX-512 (F, BW, VL) with VNNI: `vpdpbusd` on 512-bit vectors; the direct
    /// depthwise kernel also needs VBMI (`vpermb`) and runs the AVX2 one without it.
    Avx512Vnni,
    /// x86-64 AVX2 with AVX-VNNI: `vpdpbusd` on 256-bit vectors (Alder Lake and later, Zen 5).
    AvxVnni,
    /// x86-64 AVX2: `vpmaddubsw` where the packed weights cannot saturate it (decided per
    /// weight matrix when it is packed), exact widening (`vpmaddwd` on 16-bit halves)
    /// otherwise.
    Avx2,
    /// AArch64 NEON with the dot product instructions (`sdot`/`udot`, the `dotprod` feature of
    /// Armv8.2 and later).
    NeonDot,
    /// AArch64 NEON without them: widening multiplies (`smull`/`umull`, `sadalp`/`uadalp`).
    Neon,
    /// Portable Rust loops, on any CPU.
    Portable,
}

impl Isa {
    /// Every instruction set, fastest first within each architecture.
    pub const ALL: [Isa; 6] = [
        Isa::Avx512Vnni,
        Isa::AvxVnni,
        Isa::Avx2,
        Isa::NeonDot,
        Isa::Neon,
        Isa::Portable,
    ];

    /// The name [`ISA_VAR`] and [`FromStr`](std::str::FromStr) take, and `Display` prints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx2 => "avx2",
            Isa::NeonDot => "neon-dot",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU (and build) runs it; the error names what it lacks.
    pub fn check(self) -> Result<(), IsaError> {
        let cpu = cpu();
        let (ok, needs) = match self {
            Isa::Avx512Vnni => (
                cpu.avx512_vnni,
                "an x86-64 CPU with AVX2 and AVX-512 F, BW, VL and VNNI",
            ),
            Isa::AvxVnni => (cpu.avx_vnni, "an x86-64 CPU with AVX2 and AVX-VNNI"),
            Isa::Avx2 => (cpu.avx2, "an x86-64 CPU with AVX2"),
            Isa::NeonDot => (
                cpu.neon_dot,
                "an AArch64 CPU with NEON and the dot product instructions (dotprod)",
            ),
            Isa::Neon => (cpu.neon, "an AArch64 CPU with NEON"),
            Isa::Portable => (true, ""),
        };
        if ok {
            Ok(())
        } else {
            Err(IsaError::Unsupported { isa: self, needs })
        }
    }

    /// Whether the CPU has AVX2 under this choice (the loops of `ops` and requantization
    /// compiled for AVX2 may run).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn x86_avx2(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::AvxVnni | Isa::Avx2)
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Isa {
        Isa::ALL[code as usize]
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = IsaError;

    /// A name of [`Isa::name`], in any case, with or without its dashes (`avx512vnni` is
    /// `avx512` too).
    fn from_str(s: &str) -> Result<Isa, IsaError> {
        let key: String = s
            .trim()
            .chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let isa = match key.as_str() {
            "avx512" | "avx512vnni" => Isa::Avx512Vnni,
            "avxvnni" => Isa::AvxVnni,
            "avx2" => Isa::Avx2,
            "neondot" | "dotprod" => Isa::NeonDot,
            "neon" => Isa::Neon,
            "portable" => Isa::Portable,
            _ => {
                return Err(IsaError::Unknown {
                    value: s.to_string(),
                });
            }
        };
        Ok(isa)
    }
}

/// An instruction set that cannot be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IsaError {
    /// Not a name of [`Isa::name`].
    #[error(
        "unknown instruction set {value:?}: allowed are avx512, avx-vnni, avx2, neon-dot, neon, portable (and auto)"
    )]
    Unknown {
        /// The name given.
        value: String,
    },
    /// The CPU or build lacks it.
    #[error("instruction set {isa} needs {needs}, which this machine lacks")]
    Unsupported {
        /// The instruction set asked for.
        isa: Isa,
        /// What it needs.
        needs: &'static str,
    },
}

/// What the CPU has, as the kernels need it. Detected once ([`cpu`]): the only place the
/// runtime asks the CPU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cpu {
    /// AVX2 (x86-64).
    pub avx2: bool,
    /// AVX2 and AVX-512 F, BW, VL, VNNI.
    pub avx512_vnni: bool,
    /// All of `avx512_vnni` and AVX-512 VBMI (`vpermb`, the direct depthwise kernel).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub avx512_vbmi: bool,
    /// AVX2 and AVX-VNNI.
    pub avx_vnni: bool,
    /// NEON (AArch64).
    pub neon: bool,
    /// NEON and the dot product instructions.
    pub neon_dot: bool,
}

/// The CPU's features, detected on the first call.
pub(crate) fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2");
    let avx512_vnni =
        avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni");
    Cpu {
        avx2,
        avx512_vnni,
        avx512_vbmi: avx512_vnni && has!("avx512vbmi"),
        avx_vnni: avx2 && has!("avxvnni"),
        ..Cpu::default()
    }
}

#[cfg(target_arch = "aarch64")]
fn detect() -> Cpu {
    use std::arch::is_aarch64_feature_detected as has;
    let neon = has!("neon");
    Cpu {
        neon,
        neon_dot: neon && has!("dotprod"),
        ..Cpu::default()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> Cpu {
    Cpu::default()
}

/// The instruction sets this machine runs, fastest first ([`Isa::Portable`] always last).
pub fn available() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.check().is_ok()).collect()
}

/// The instruction sets this machine does not run, each with the reason.
pub fn unavailable() -> Vec<(Isa, IsaError)> {
    Isa::ALL
        .into_iter()
        .filter_map(|i| i.check().err().map(|e| (i, e)))
        .collect()
}

/// The fastest instruction set this machine runs.
pub fn best() -> Isa {
    available()[0]
}

/// The instruction set [`ISA_VAR`] asks for: `None` when it is unset, empty or `auto`; an
/// error when it names no instruction set or one this machine lacks.
pub fn env_isa() -> Result<Option<Isa>, IsaError> {
    let Some(value) = std::env::var_os(ISA_VAR) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    if value.trim().is_empty() || value.trim().eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let isa: Isa = value.parse()?;
    isa.check()?;
    Ok(Some(isa))
}

/// The process's starting choice: [`ISA_VAR`] if it names an instruction set this machine
/// runs, else [`best`]; a value that cannot be used is reported once on stderr (naming the
/// variable, the value and the choices), never dropped silently.
fn initial() -> Isa {
    static INITIAL: OnceLock<Isa> = OnceLock::new();
    *INITIAL.get_or_init(|| match env_isa() {
        Ok(isa) => isa.unwrap_or_else(best),
        Err(e) => {
            let best = best();
            let allowed: Vec<&str> = available().iter().map(|i| i.name()).collect();
            // Straight to stderr: a test harness capturing `eprintln!` does not hide it.
            let _ = writeln!(
                std::io::stderr(),
                "burn-qat-runtime: warning: {ISA_VAR}={:?} is not usable: {e}; allowed on this machine: {} (or auto); using {best}",
                std::env::var_os(ISA_VAR).unwrap_or_default(),
                allowed.join(", "),
            );
            best
        }
    })
}

/// No choice stored yet: [`isa`](fn@isa) makes the initial one.
const UNSET: u8 = u8::MAX;

/// The current choice, as [`Isa::code`]. Holds only instruction sets this machine runs: every
/// store is checked ([`set_isa`], [`force_isa`], [`initial`]), which is what the kernels'
/// `unsafe` dispatch relies on.
static CURRENT: AtomicU8 = AtomicU8::new(UNSET);

/// The instruction set the kernels run on now.
pub fn isa() -> Isa {
    match CURRENT.load(Ordering::Relaxed) {
        UNSET => {
            let first = initial();
            // A concurrent `set_isa` wins over the initial choice.
            let _ =
                CURRENT.compare_exchange(UNSET, first.code(), Ordering::Relaxed, Ordering::Relaxed);
            Isa::from_code(CURRENT.load(Ordering::Relaxed))
        }
        code => Isa::from_code(code),
    }
}

/// Makes every kernel of this process run on `isa` from now on (an error, and no change, when
/// this machine lacks it). Kernels running meanwhile finish on either choice: they give the
/// same bits. Tests that want a kernel to run on one instruction set hold a [`force_isa`]
/// guard instead, which keeps other guarded tests from switching it meanwhile.
pub fn set_isa(isa: Isa) -> Result<(), IsaError> {
    isa.check()?;
    // Read the environment once, whatever comes first (its warning is not lost).
    initial();
    CURRENT.store(isa.code(), Ordering::Relaxed);
    Ok(())
}

/// Held by the [`IsaGuard`]s of one thread at a time.
static GUARD: Mutex<()> = Mutex::new(());

thread_local! {
    /// How many [`IsaGuard`]s this thread holds (nested guards share the thread's lock).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// Sets `isa` until the guard is dropped, then restores the previous choice. One thread at a
/// time holds guards (a `force_isa` on another thread waits for them to drop), so tests that
/// force an instruction set do not switch each other's; on the thread that holds one, a second
/// `force_isa` nests (drop the guards in reverse order). Code running meanwhile without a guard
/// runs on the forced choice (same bits).
///
/// ```
/// use burn_qat_runtime::kernels::{Isa, force_isa, isa};
///
/// let outer = force_isa(Isa::Portable).unwrap();
/// {
///     let _inner = force_isa(Isa::Portable).unwrap(); // nests on this thread
///     assert_eq!(isa(), Isa::Portable);
/// }
/// drop(outer);
/// ```
pub fn force_isa(isa: Isa) -> Result<IsaGuard, IsaError> {
    isa.check()?;
    let lock = if HELD.get() == 0 {
        // A test that panicked while holding a guard restored the choice as it unwound.
        Some(GUARD.lock().unwrap_or_else(|p| p.into_inner()))
    } else {
        None
    };
    HELD.set(HELD.get() + 1);
    let previous = self::isa();
    CURRENT.store(isa.code(), Ordering::Relaxed);
    Ok(IsaGuard {
        previous,
        _lock: lock,
    })
}

/// Keeps an instruction set forced (see [`force_isa`]); dropping it restores the previous one.
/// It stays on the thread that made it (it is not `Send`: the lock belongs to that thread).
#[must_use = "the instruction set is restored when the guard is dropped"]
pub struct IsaGuard {
    previous: Isa,
    /// The outermost guard of a thread holds the lock; nested ones hold none.
    _lock: Option<MutexGuard<'static, ()>>,
}

impl Drop for IsaGuard {
    fn drop(&mut self) {
        // Runs before `_lock` is released.
        CURRENT.store(self.previous.code(), Ordering::Relaxed);
        HELD.set(HELD.get() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
            assert_eq!(isa.name().to_uppercase().parse::<Isa>(), Ok(isa));
            assert_eq!(Isa::from_code(isa.code()), isa);
        }
        assert_eq!("avx512_vnni".parse::<Isa>(), Ok(Isa::Avx512Vnni));
        let err = "sse".parse::<Isa>().unwrap_err();
        assert!(err.to_string().contains("\"sse\""), "{err}");
        assert!(err.to_string().contains("avx2"), "{err}");
    }

    #[test]
    fn the_machine_runs_what_it_lists_and_only_that() {
        let available = available();
        assert_eq!(available.last(), Some(&Isa::Portable));
        // `set_isa` under a guard: no other test's guard changes the choice meanwhile, and
        // dropping the guard restores the choice from before it.
        let guard = force_isa(Isa::Portable).unwrap();
        assert_eq!(isa(), Isa::Portable);
        for isa in Isa::ALL {
            match set_isa(isa) {
                Ok(()) => {
                    assert!(available.contains(&isa));
                    assert_eq!(super::isa(), isa);
                }
                Err(e) => {
                    assert!(!available.contains(&isa));
                    assert!(e.to_string().contains(isa.name()), "{e}");
                }
            }
        }
        drop(guard);
    }
}
