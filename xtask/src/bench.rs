//! `cargo xtask bench`: throughput and latency of each backend beside a raw baseline measured
//! in the same run. Every row carries `ratio = value / baseline_value` (for throughput higher is
//! better; for latency lower is better).

use std::process::{Command, ExitCode};
use std::time::Instant;

/// Run-size options.
#[derive(Debug, Clone, Copy)]
pub struct BenchOpts {
    /// Fewer iterations: the whole run stays well under a minute.
    pub quick: bool,
    /// Only this backend's rows (for profiling one path).
    pub only: Option<&'static str>,
    /// Run everything on one thread (tokio's current-thread runtime): every wake-up stays on
    /// that thread, so rows measure the code's cost without the VM's cross-vCPU wake-ups.
    pub single_thread: bool,
    /// Only this kind of row: `rtt`, `small` (64 B one-way) or `large` (large one-way); for
    /// profiling one path.
    pub scenario: Option<&'static str>,
}

impl BenchOpts {
    /// True when `backend`'s rows should run.
    pub fn wants(&self, backend: &str) -> bool {
        self.only.is_none_or(|o| o == backend)
    }

    /// True when rows of `scenario` (`rtt`, `small`, `large`) should run.
    pub fn wants_scenario(&self, scenario: &str) -> bool {
        self.scenario.is_none_or(|s| s == scenario)
    }
}

/// One measured figure beside its baseline.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Backend measured.
    pub backend: String,
    /// What was measured.
    pub scenario: String,
    /// Payload bytes per message.
    pub msg_bytes: usize,
    /// `throughput`, `rtt_median`, `rtt_p99`, …
    pub metric: String,
    /// The project's figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// The baseline's name.
    pub baseline: String,
    /// The baseline's figure, same unit.
    pub baseline_value: f64,
    /// `value / baseline_value`.
    pub ratio: f64,
}

impl BenchRow {
    fn json(&self) -> String {
        serde_json::json!({
            "backend": self.backend,
            "scenario": self.scenario,
            "msg_bytes": self.msg_bytes,
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
        })
        .to_string()
    }
}

/// Rounds of an interleaved throughput measurement (see [`interleaved`]).
pub const ROUNDS: usize = 5;

/// Measures a throughput row as `ROUNDS` rounds of baseline-then-project, each call on the
/// row's count of messages per round, and returns the medians `(project, baseline)`. Five
/// rounds, not three: raw tokio-tungstenite's 64 KiB rounds read 15k to 59k msgs/s within one
/// run, and with three one odd round decided the median. One pair measured
/// once swings with the VM's neighbours (a raw baseline read 2.2 and 4.5 GB/s in consecutive
/// runs here); interleaving exposes both sides to the same conditions and the median drops the
/// odd round. `HIVEWIRE_BENCH_TRACE` and `HIVEWIRE_BENCH_SIDE` work as for
/// [`interleaved_samples`].
pub async fn interleaved<B, P, EB, EP>(mut base: B, mut ours: P) -> Result<(f64, f64), String>
where
    B: AsyncFnMut() -> Result<f64, EB>,
    P: AsyncFnMut() -> Result<f64, EP>,
    EB: std::fmt::Debug,
    EP: std::fmt::Debug,
{
    let trace = std::env::var_os("HIVEWIRE_BENCH_TRACE").is_some();
    let side = std::env::var("HIVEWIRE_BENCH_SIDE").ok();
    let (mut b, mut p) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for round in 0..ROUNDS {
        b.push(match side.as_deref() {
            Some("ours") => f64::NAN,
            _ => base().await.map_err(|e| format!("baseline: {e:?}"))?,
        });
        p.push(match side.as_deref() {
            Some("raw") => f64::NAN,
            _ => ours().await.map_err(|e| format!("project: {e:?}"))?,
        });
        if trace {
            eprintln!("throughput round {round}: raw {:.0}, ours {:.0} per s", b[round], p[round]);
        }
    }
    Ok((median(&mut p), median(&mut b)))
}

/// Rounds of an interleaved round-trip measurement (see [`interleaved_samples`]).
pub const RTT_ROUNDS: usize = 5;

/// Measures a latency row as `RTT_ROUNDS` rounds of baseline-then-project, each call given a
/// `RTT_ROUNDS`th of `iters` (each call sets up its own pair and drops its own warm-up), and
/// returns all samples of each side `(project, baseline)`.
///
/// Why: on a 2-worker runtime a ping-pong settles at random into one of two modes: both tasks
/// on one worker (the worker that wrote finds the reply's readiness when it next polls the
/// I/O driver: no cross-vCPU wake-up) or one task per worker (every write wakes the other
/// worker out of `epoll_wait`: ~35 µs more per hop on this VM). A row measured once draws its
/// mode once, so a baseline and a project row measured once each compare two coin tosses as
/// often as two backends (raw tcp read 15.6 and 79.7 µs in consecutive runs, the project
/// 86.1 and 83.6). Interleaved rounds draw the mode several times for both sides, under the
/// same conditions. `HIVEWIRE_BENCH_TRACE=1` prints each round's medians to stderr;
/// `HIVEWIRE_BENCH_SIDE=raw` or `=ours` measures only that side (for profiling one of them;
/// the row's other figure is then NaN).
pub async fn interleaved_samples<B, P, EB, EP>(
    label: &str,
    iters: usize,
    mut base: B,
    mut ours: P,
) -> Result<(Vec<f64>, Vec<f64>), String>
where
    B: AsyncFnMut(usize) -> Result<Vec<f64>, EB>,
    P: AsyncFnMut(usize) -> Result<Vec<f64>, EP>,
    EB: std::fmt::Debug,
    EP: std::fmt::Debug,
{
    let trace = std::env::var_os("HIVEWIRE_BENCH_TRACE").is_some();
    let side = std::env::var("HIVEWIRE_BENCH_SIDE").ok();
    let per_round = (iters / RTT_ROUNDS).max(10);
    let (mut b, mut p) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for round in 0..RTT_ROUNDS {
        let mut rb = match side.as_deref() {
            Some("ours") => vec![f64::NAN],
            _ => base(per_round).await.map_err(|e| format!("baseline: {e:?}"))?,
        };
        let mut rp = match side.as_deref() {
            Some("raw") => vec![f64::NAN],
            _ => ours(per_round).await.map_err(|e| format!("project: {e:?}"))?,
        };
        if trace {
            eprintln!("{label} round {round}: raw {:.1} us, ours {:.1} us", median(&mut rb), median(&mut rp));
        }
        b.extend(rb);
        p.extend(rp);
    }
    Ok((p, b))
}

/// Runs `fut` as a runtime task and waits for it. Round-trip loops run as tasks, baseline and
/// project alike, as the README tells applications to run their loops: a loop left in
/// `block_on` runs on the main thread, off the runtime's workers, so every reply has to wake
/// that thread from another one (one cross-thread wake-up per round trip for every row, whose
/// cost on this VM depends on whether the two threads share a vCPU: 15 or 70 µs for the
/// same raw tcp ping-pong).
pub async fn in_task<T, E>(
    fut: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<std::io::Error> + Send + 'static,
{
    tokio::spawn(fut).await.map_err(|e| E::from(std::io::Error::other(e)))?
}

/// The project's side of a round-trip row: `hub` answers `echo` requests from a task of its
/// own; `a` sends `iters` requests of `len` bytes (and a tenth more first, as warm-up) from a
/// runtime task, one sample per answered request, in µs. `lossy` (udp): a request not answered
/// within 100 ms is skipped; otherwise one not answered within 10 s fails the row. Closes both
/// nodes.
pub async fn project_round_trips(
    hub: hivewire::Node,
    a: hivewire::Node,
    iters: usize,
    len: usize,
    lossy: bool,
) -> Result<Vec<f64>, hivewire::TransportError> {
    use hivewire::{Message, MessageType};
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            if responder.respond_bytes(&req, req.payload.clone()).await.is_err() {
                break;
            }
        }
    });
    let requester = a.clone();
    let timeout = std::time::Duration::from_millis(if lossy { 100 } else { 10_000 });
    let samples = in_task(async move {
        let payload = bytes::Bytes::from(vec![7u8; len]);
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let req = Message::new("a", MessageType::Request { method: "echo".into() })
                .with_payload_bytes(payload.clone());
            let t = Instant::now();
            match requester.request_message("hub", req, timeout).await {
                Ok(_) => {}
                Err(_) if lossy => continue,
                Err(e) => return Err(e),
            }
            if i >= iters / 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })
    .await;
    a.close().await;
    hub.close().await;
    samples
}

/// Median of `v` (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// The `p`-th percentile of `v` (nearest rank; sorts it). NaN for an empty slice.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Sends `msg` to `to` `n` times from a spawned task (as the README tells applications to run
/// their loops) and waits for the last send to return.
pub async fn send_from_task(
    node: &hivewire::Node,
    to: &str,
    msg: hivewire::Message,
    n: usize,
) -> Result<(), hivewire::TransportError> {
    let (node, to) = (node.clone(), to.to_string());
    tokio::spawn(async move {
        for _ in 0..n {
            node.send(&to, msg.clone()).await?;
        }
        Ok(())
    })
    .await
    .map_err(|e| hivewire::TransportError::ConnectionError(e.to_string()))?
}

/// Raw baseline: one-way throughput (msgs/s) of `n` frames of `len` bytes fed into `sink`
/// from a spawned task (writes coalesced by the sink's buffer, as any efficient raw sender
/// would) while another task counts the frames `stream` yields.
pub async fn raw_framed_one_way<K, R>(sink: K, stream: R, len: usize, n: usize) -> std::io::Result<f64>
where
    K: futures::Sink<bytes::Bytes, Error = std::io::Error> + Unpin + Send + 'static,
    R: futures::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin + Send + 'static,
{
    use futures::{SinkExt, StreamExt};
    let (mut sink, mut stream) = (sink, stream);
    let consumer = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match stream.next().await {
                Some(Ok(_)) => got += 1,
                _ => break,
            }
        }
        (got, Instant::now())
    });
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let payload = bytes::Bytes::from(vec![7u8; len]);
        for _ in 0..n {
            sink.feed(payload.clone()).await?;
        }
        sink.flush().await?;
        Ok::<_, std::io::Error>(sink)
    });
    let _sink = sender.await.map_err(std::io::Error::other)??;
    let (got, end) = consumer.await.map_err(std::io::Error::other)?;
    Ok(got as f64 / (end - start).as_secs_f64())
}

/// Raw baseline: one-way throughput (msgs/s) of `n` items through a bounded tokio mpsc.
pub async fn mpsc_baseline_throughput<T: Send + Clone + 'static>(item: T, n: usize) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<T>(1024);
    // Producer and consumer both run as runtime tasks.
    let consumer = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            if rx.recv().await.is_none() {
                break;
            }
            got += 1;
        }
        (got, Instant::now())
    });
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            if tx.send(item.clone()).await.is_err() {
                break;
            }
        }
    });
    let (got, end) = consumer.await.unwrap_or((0, Instant::now()));
    let _ = producer.await;
    got as f64 / (end - start).as_secs_f64()
}

/// Raw baseline: round trips through two bounded tokio mpsc channels and an echo task; one
/// sample per iteration, in µs (the first tenth is warm-up and dropped).
pub async fn mpsc_baseline_rtt<T: Send + Clone + 'static>(item: T, iters: usize) -> Vec<f64> {
    let (to_echo, mut echo_rx) = tokio::sync::mpsc::channel::<T>(1024);
    let (back, mut rx) = tokio::sync::mpsc::channel::<T>(1024);
    tokio::spawn(async move {
        while let Some(m) = echo_rx.recv().await {
            if back.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        if to_echo.send(item.clone()).await.is_err() || rx.recv().await.is_none() {
            break;
        }
        if i >= iters / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples
}

/// Every row the project measures, each beside its baseline. Add one call per backend here.
/// Each group of rows (inproc, the streams, quic, udp, shm) runs in a runtime of its own,
/// dropped before the next starts: tasks a backend leaves behind (drivers, timers) must not
/// share the workers with the next one's measurement.
fn project_rows(opts: BenchOpts) -> Result<Vec<BenchRow>, std::io::Error> {
    let mut rows = Vec::new();
    for group in 0..5 {
        let rt = if opts.single_thread {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        }?;
        rows.extend(rt.block_on(async {
            match group {
                0 if opts.wants("inproc") => crate::inproc_bench::rows(&opts).await,
                1 => crate::stream_bench::rows(&opts).await,
                2 => crate::quic_bench::rows(&opts).await,
                3 => crate::udp_bench::rows(&opts).await,
                4 => crate::shm_bench::rows(&opts).await,
                _ => Vec::new(),
            }
        }));
        rt.shutdown_timeout(std::time::Duration::from_secs(2));
    }
    Ok(rows)
}

/// A fixed amount of CPU work (integer arithmetic, data-dependent branches, small table
/// writes; no system calls, no allocation), timed in ms: the median of five runs.
///
/// The same binary reads nearly the same on the same machine, so it shows how fast the machine
/// running the bench is at the kind of work our per-message path does. The CPU-bound rows (64 B
/// throughput above all) scale with it; raw baselines that are bound by system calls much less,
/// so ratios from a slow machine understate the project. Printed before and after the rows (a
/// machine's speed can change during a run).
pub fn cpu_yardstick_ms() -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let (mut x, mut table) = (0x9E37_79B9_7F4A_7C15u64, [0u64; 64]);
            for i in 0..20_000_000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let slot = (x & 63) as usize;
                if x & 0x100 != 0 {
                    table[slot] = table[slot].wrapping_add(i);
                } else {
                    table[slot] ^= x;
                }
            }
            std::hint::black_box((x, table));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&mut runs)
}

fn print_table(rows: &[BenchRow]) {
    println!("ratio = value / baseline_value, for every metric (throughput: higher is better; latency: lower is better)");
    println!(
        "{:8} {:18} {:>7} {:11} {:>14} {:7} {:20} {:>14} {:>7}",
        "backend", "scenario", "bytes", "metric", "value", "unit", "baseline", "baseline", "ratio"
    );
    for r in rows {
        println!(
            "{:8} {:18} {:>7} {:11} {:>14.2} {:7} {:20} {:>14.2} {:>7.3}",
            r.backend,
            r.scenario,
            r.msg_bytes,
            r.metric,
            r.value,
            r.unit,
            r.baseline,
            r.baseline_value,
            r.ratio
        );
    }
}

/// What the command line asks for: the run's options, `--json`, and `--lto` (the build).
struct Parsed {
    opts: BenchOpts,
    json: bool,
    lto: bool,
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let (mut quick, mut json, mut only, mut single_thread, mut scenario) = (false, false, None, false, None);
    let mut lto = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--json" => json = true,
            "--single-thread" => single_thread = true,
            "--lto" => lto = true,
            "--only" => {
                let name = it.next().ok_or("--only needs a backend name")?;
                only = Some(match name.as_str() {
                    "inproc" => "inproc",
                    "tcp" => "tcp",
                    "tls" => "tls",
                    "uds" => "uds",
                    "ws" => "ws",
                    "quic" => "quic",
                    "udp" => "udp",
                    "shm" => "shm",
                    other => {
                        return Err(format!(
                            "unknown backend {other:?}; known: inproc, tcp, tls, uds, ws, quic, udp, shm"
                        ))
                    }
                });
            }
            "--scenario" => {
                let name = it.next().ok_or("--scenario needs a name")?;
                scenario = Some(match name.as_str() {
                    "rtt" => "rtt",
                    "small" => "small",
                    "large" => "large",
                    other => return Err(format!("unknown scenario {other:?}; known: rtt, small, large")),
                });
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Parsed { opts: BenchOpts { quick, only, single_thread, scenario }, json, lto })
}

/// Cargo profile of the measuring build: `release`, or `release-lto` for `--lto`.
fn profile(lto: bool) -> &'static str {
    if lto {
        "release-lto"
    } else {
        "release"
    }
}

/// The `cargo` arguments that build and start the measuring process.
fn cargo_run_args(lto: bool) -> [&'static str; 8] {
    ["run", "--profile", profile(lto), "--quiet", "--package", "xtask", "--", "bench-run"]
}

/// `cargo xtask bench`: re-runs itself as an optimised build.
pub fn main(args: &[String]) -> ExitCode {
    let lto = match parse(args) {
        Ok(p) => p.lto,
        Err(e) => {
            eprintln!(
                "bench: {e}\nusage: cargo xtask bench [--quick] [--json] [--only BACKEND] [--scenario rtt|small|large] [--single-thread] [--lto]"
            );
            return ExitCode::from(2);
        }
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(cargo_run_args(lto)).args(args).status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("bench: {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: cannot start cargo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The measuring process (a `release` or, with `--lto`, `release-lto` build).
pub fn run(args: &[String]) -> ExitCode {
    let Parsed { opts, json, lto } = match parse(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let yardstick_before = cpu_yardstick_ms();
    let rows = match project_rows(opts) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let yardstick_after = cpu_yardstick_ms();
    if json {
        for r in &rows {
            println!("{}", r.json());
        }
        println!(
            "{}",
            serde_json::json!({ "cpu_yardstick_ms": { "before": yardstick_before, "after": yardstick_after } })
        );
        println!("{}", serde_json::json!({ "build_profile": profile(lto) }));
    } else {
        print_table(&rows);
        println!(
            "cpu yardstick (fixed integer loop, median of 5; higher = slower machine): {yardstick_before:.1} ms before the rows, {yardstick_after:.1} ms after"
        );
        println!("build profile: {} (baselines and project built alike)", profile(lto));
    }
    if rows.is_empty() {
        eprintln!("bench: no rows measured");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lto_selects_the_release_lto_profile_and_nothing_else() {
        let plain = parse(&args(&["--quick", "--only", "uds"])).unwrap();
        assert!(!plain.lto);
        assert_eq!(cargo_run_args(plain.lto)[..3], ["run", "--profile", "release"]);
        let lto = parse(&args(&["--lto", "--quick", "--json"])).unwrap();
        assert!(lto.lto && lto.json && lto.opts.quick);
        assert_eq!(cargo_run_args(lto.lto)[..3], ["run", "--profile", "release-lto"]);
        // The measuring process is the xtask binary's `bench-run`, whichever the profile.
        assert_eq!(cargo_run_args(true)[3..], ["--quiet", "--package", "xtask", "--", "bench-run"]);
        assert!(parse(&args(&["--ltoo"])).is_err());
    }

    #[test]
    fn the_release_lto_profile_is_declared_in_the_workspace() {
        // `cargo run --profile release-lto` fails on a profile the workspace does not declare.
        let manifest =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
        let section = manifest.split("[profile.release-lto]").nth(1).expect("profile declared");
        let section = section.split("\n[").next().unwrap_or_default();
        assert!(section.contains("inherits = \"release\""), "{section}");
        assert!(section.contains("lto = \"fat\""), "{section}");
        assert!(section.contains("codegen-units = 1"), "{section}");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
        let mut one = vec![3.0];
        assert_eq!(median(&mut one), 3.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }
}
