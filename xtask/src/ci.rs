//! `cargo xtask ci`: every check `.ci/run` makes, in order, failing fast.

use std::process::{Command, ExitCode};
use std::time::Instant;

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn step(name: &str, mut cmd: Command) -> Result<(), String> {
    timed(name, || {
        let status = cmd.status().map_err(|e| format!("{name}: cannot start: {e}"))?;
        Ok((status.success(), status.to_string()))
    })
}

/// Runs one check between `==>`/`<==` lines with its time; `run` says whether it passed and
/// how to describe its outcome.
fn timed(name: &str, run: impl FnOnce() -> Result<(bool, String), String>) -> Result<(), String> {
    let start = Instant::now();
    println!("\n==> {name}");
    let (ok, outcome) = run()?;
    println!("<== {name}: {outcome} in {:.1}s", start.elapsed().as_secs_f64());
    if ok {
        Ok(())
    } else {
        Err(format!("{name} failed ({outcome})"))
    }
}

/// The backend features of the facade, read from its manifest at run time.
fn facade_features() -> Result<Vec<String>, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("crates/hivewire/Cargo.toml"))
        .map_err(|e| format!("reading the facade manifest: {e}"))?;
    let features = backend_features(&text);
    if features.is_empty() {
        return Err("the facade manifest declares no backend feature".into());
    }
    Ok(features)
}

/// Every key of the `[features]` table of `manifest` but `default` and `full`, in order.
/// Multi-line arrays are fine: their continuation lines hold no `=`.
fn backend_features(manifest: &str) -> Vec<String> {
    let mut in_features = false;
    let mut out = Vec::new();
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if t.starts_with('[') && !t.contains('=') {
            in_features = t == "[features]";
            continue;
        }
        if in_features {
            if let Some((name, _)) = t.split_once('=') {
                let name = name.trim().trim_matches('"');
                if !name.is_empty() && name != "default" && name != "full" {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

fn has_cargo_deny() -> bool {
    cargo().args(["deny", "--version"]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn run_all() -> Result<(), String> {
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    step("cargo fmt --check", c)?;
    let mut c = cargo();
    c.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    step("cargo clippy -D warnings", c)?;
    let mut c = cargo();
    c.args(["test", "--workspace"]);
    step("cargo test --workspace", c)?;
    for f in facade_features()? {
        let mut c = cargo();
        c.args(["check", "-p", "hivewire", "--no-default-features", "--features", &f]);
        step(&format!("facade builds with only feature {f}"), c)?;
    }
    let mut c = cargo();
    c.args(["check", "-p", "hivewire", "--no-default-features"]);
    step("facade builds with no backend", c)?;
    if has_cargo_deny() {
        let mut c = cargo();
        c.args(["deny", "check", "bans", "licenses", "sources"]);
        step("cargo deny check bans licenses sources", c)?;
    } else {
        println!("\n==> cargo deny: skipped: cargo-deny is not installed (.ci/run installs it)");
    }
    println!("cargo deny: `advisories` skipped: its database cannot be fetched on this offline machine");
    // In this process rather than through `cargo run`: this binary is `cargo xtask`, already
    // built, yet a second `cargo run -p xtask` after the steps above compiled and linked it
    // again (CI logs show the link): time and disk for nothing.
    timed("cargo xtask conformance", || {
        let ok = crate::conformance::main(&[]) == ExitCode::SUCCESS;
        Ok((ok, if ok { "passed" } else { "a scenario failed: see the matrix above" }.to_string()))
    })
}

/// Entry point.
pub fn main(args: &[String]) -> ExitCode {
    if !args.is_empty() {
        eprintln!("usage: cargo xtask ci");
        return ExitCode::from(2);
    }
    let start = Instant::now();
    match run_all() {
        Ok(()) => {
            println!("\nci: all checks passed in {:.0}s", start.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nci: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::backend_features;

    #[test]
    fn backend_features_skip_default_full_and_other_tables() {
        let manifest = r#"
[package]
name = "hivewire"
version = "0.1.0"

[features]
default = ["inproc"]
# one per backend
inproc = ["dep:hivewire-inproc"]
tcp = [
    "dep:hivewire-tcp",
]
"quic" = ["dep:hivewire-quic"]
full = ["inproc", "tcp", "quic"]

[dependencies]
serde = { version = "1", features = ["derive"] }
"#;
        assert_eq!(backend_features(manifest), ["inproc", "tcp", "quic"]);
    }
}
