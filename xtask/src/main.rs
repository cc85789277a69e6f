//! `cargo xtask`: the project's own commands.
//!
//! * `cargo xtask conformance [--backend NAME] [--scenario NAME] [--json]` — every backend ×
//!   every scenario, as a matrix (exit 1 on any failure);
//! * `cargo xtask bench [--quick] [--json]` — the benchmarks beside their raw baselines
//!   (re-runs itself in release mode; `--lto`: the `release-lto` profile);
//! * `cargo xtask ci` — what `.ci/run` runs: fmt, clippy, tests, per-feature builds, cargo-deny,
//!   conformance.

mod bench;
mod ci;
mod conformance;
mod inproc_bench;
mod quic_bench;
mod shm_bench;
mod stream_bench;
mod udp_bench;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <conformance [--backend NAME] [--scenario NAME] [--json] | bench [--quick] [--json] [--only BACKEND] [--scenario rtt|small|large] [--single-thread] [--lto] | ci>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match cmd.as_str() {
        "conformance" => conformance::main(rest),
        "bench" => bench::main(rest),
        "bench-run" => bench::run(rest),
        "bench-hub" => shm_bench::hub_main(rest),
        "ci" => ci::main(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
