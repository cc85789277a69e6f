//! `cargo xtask conformance`: runs the suite of `hivewire-conformance` for every backend and
//! prints a backend × scenario matrix.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use hivewire_conformance::{all_backends, run_suite, scenario_names, BackendFactory, Outcome};

struct Opts {
    backend: Option<String>,
    scenario: Option<String>,
    json: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts { backend: None, scenario: None, json: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => o.json = true,
            "--backend" => o.backend = Some(it.next().ok_or("--backend needs a name")?.clone()),
            "--scenario" => o.scenario = Some(it.next().ok_or("--scenario needs a name")?.clone()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// Entry point.
pub fn main(args: &[String]) -> ExitCode {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("conformance: {e}\nusage: cargo xtask conformance [--backend NAME] [--scenario NAME] [--json]");
            return ExitCode::from(2);
        }
    };
    let mut backends: Vec<Arc<dyn BackendFactory>> = all_backends();
    let known: Vec<&'static str> = backends.iter().map(|b| b.name()).collect();
    if let Some(name) = &opts.backend {
        backends.retain(|b| b.name() == name);
        if backends.is_empty() {
            eprintln!("conformance: unknown backend {name:?}; known: {}", known.join(", "));
            return ExitCode::from(2);
        }
    }
    if let Some(s) = &opts.scenario {
        if !scenario_names().contains(&s.as_str()) {
            eprintln!("conformance: unknown scenario {s:?}; known: {}", scenario_names().join(", "));
            return ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conformance: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // backend -> scenario -> outcome
    let mut results: Vec<(&'static str, Vec<(&'static str, Outcome)>)> = Vec::new();
    for b in backends {
        if !opts.json {
            eprintln!("conformance: running {} ...", b.name());
        }
        let reports = rt.block_on(run_suite(b.clone(), opts.scenario.as_deref()));
        results.push((b.name(), reports.into_iter().map(|r| (r.scenario, r.outcome)).collect()));
    }
    let (mut pass, mut fail, mut skip) = (0, 0, 0);
    for (_, rs) in &results {
        for (_, o) in rs {
            match o {
                Outcome::Pass => pass += 1,
                Outcome::Fail(_) => fail += 1,
                Outcome::Skip(_) => skip += 1,
            }
        }
    }
    if opts.json {
        let mut obj: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
        for (b, rs) in &results {
            let m = obj.entry(b).or_default();
            for (s, o) in rs {
                m.insert(
                    s,
                    match o {
                        Outcome::Pass => "pass".to_string(),
                        Outcome::Fail(w) => format!("fail: {w}"),
                        Outcome::Skip(w) => format!("skip: {w}"),
                    },
                );
            }
        }
        println!("{}", serde_json::to_string(&obj).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    } else {
        print_matrix(&results);
        println!("conformance: {pass} passed, {fail} failed, {skip} skipped");
    }
    if fail > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_matrix(results: &[(&'static str, Vec<(&'static str, Outcome)>)]) {
    let scenarios: Vec<&str> = {
        let mut v: Vec<&str> = Vec::new();
        for (_, rs) in results {
            for (s, _) in rs {
                if !v.contains(s) {
                    v.push(s);
                }
            }
        }
        v
    };
    let w = scenarios.iter().map(|s| s.len()).max().unwrap_or(8).max(8);
    let mut header = format!("{:w$}", "scenario");
    for (b, _) in results {
        header.push_str(&format!("  {b:>8}"));
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for s in &scenarios {
        let mut line = format!("{s:w$}");
        for (_, rs) in results {
            let cell = match rs.iter().find(|(n, _)| n == s).map(|(_, o)| o) {
                Some(Outcome::Pass) => "pass",
                Some(Outcome::Fail(_)) => "FAIL",
                Some(Outcome::Skip(_)) => "skip",
                None => "-",
            };
            line.push_str(&format!("  {cell:>8}"));
        }
        println!("{line}");
    }
    let (mut failures, mut skips) = (Vec::new(), Vec::new());
    for (b, rs) in results {
        for (s, o) in rs {
            match o {
                Outcome::Fail(w) => failures.push(format!("{b}/{s}: {w}")),
                Outcome::Skip(w) => skips.push(format!("{b}/{s}: {w}")),
                Outcome::Pass => {}
            }
        }
    }
    for (title, notes) in [("failures:", failures), ("skipped:", skips)] {
        if !notes.is_empty() {
            println!("\n{title}");
            for n in notes {
                println!("{n}");
            }
        }
    }
}
