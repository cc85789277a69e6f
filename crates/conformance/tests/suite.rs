//! Runs the whole conformance suite against every backend built into the workspace, so that
//! `cargo test --workspace` checks what `cargo xtask conformance` prints.

use hivewire_conformance::{all_backends, run_suite, scenario_names, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_passes_every_applicable_scenario() {
    let mut failures = Vec::new();
    let backends = all_backends();
    assert!(backends.iter().any(|b| b.name() == "inproc"), "inproc must be built");
    for backend in backends {
        let reports = run_suite(backend.clone(), None).await;
        assert_eq!(reports.len(), scenario_names().len(), "every scenario reports");
        for r in reports {
            match r.outcome {
                Outcome::Pass => {}
                Outcome::Skip(why) => {
                    eprintln!("{} / {}: skipped: {why}", backend.name(), r.scenario);
                    assert!(why.contains("declares"), "a skip must come from a declared capability");
                }
                Outcome::Fail(why) => failures.push(format!("{} / {}: {why}", backend.name(), r.scenario)),
            }
        }
    }
    assert!(failures.is_empty(), "conformance failures:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_declares_no_byte_path_skips_only_compression_scenarios() {
    for backend in all_backends() {
        if backend.capabilities().carries_bytes {
            continue;
        }
        let reports = run_suite(backend.clone(), Some("compression_gzip")).await;
        assert_eq!(reports.len(), 1);
        assert!(matches!(reports[0].outcome, Outcome::Skip(_)), "{:?}", reports[0]);
        let reports = run_suite(backend.clone(), Some("compression_negotiation")).await;
        assert_eq!(reports[0].outcome, Outcome::Pass, "negotiation applies to every backend");
    }
}
