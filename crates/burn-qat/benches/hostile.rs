//! The hostile-input harness of `tests/tests/hostile.rs`, run in release (no overflow checks,
//! the kernels' fast paths as users get them): mutated integer models that load must never
//! panic or disagree with the reference kernels. Not a timing benchmark: it prints the tally and
//! exits non-zero on any finding. CI runs it after the release build:
//! `target/release/deps/hostile-<hash> [cases] [seed]` (default 30,000 cases).

#[path = "../../../tests/tests/common/hostile_harness.rs"]
mod harness;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let cases = args.first().copied().unwrap_or(30_000) as usize;
    let seed = args.get(1).copied().unwrap_or(0x5EED_B0A7);
    let tally = harness::run(cases, seed);
    println!(
        "release: {} cases: {} refused, {} accepted ({} refused at run time), {} findings, slowest accepted case {:?}",
        tally.cases,
        tally.refused,
        tally.accepted,
        tally.run_errors,
        tally.findings.len(),
        tally.slowest
    );
    for f in tally.findings.iter().take(40) {
        println!("{f}");
    }
    if !tally.findings.is_empty() {
        std::process::exit(1);
    }
}
