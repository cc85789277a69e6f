//! Shared-memory rows of `cargo xtask bench`: across two real processes (this binary re-run as
//! `bench-hub URL`, a hub that echoes requests and counts events), beside the baselines the
//! issue names, measured in the same run: two threads ping-ponging an atomic flag in one cache
//! line (the hardware floor of a round trip), the uds backend across the same two processes,
//! and memcpy bandwidth for the large messages. The `*_link_lent` rows put a client on the link
//! itself (`dial_link`) that receives with `recv_lent`: payloads read where they lie in the
//! ring, on the client's own thread.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire::{Message, MessageType, Node, TransportConfig};

use crate::bench::{median, percentile, BenchOpts, BenchRow};

const SMALL: usize = 64;
/// Rings big enough for 10 MiB messages in one record.
const RING: usize = 32 << 20;

fn row(
    scenario: &str,
    bytes: usize,
    metric: &str,
    value: f64,
    unit: &str,
    baseline: &str,
    base: f64,
) -> BenchRow {
    BenchRow {
        backend: "shm".into(),
        scenario: scenario.into(),
        msg_bytes: bytes,
        metric: metric.into(),
        value,
        unit: unit.into(),
        baseline: baseline.into(),
        baseline_value: base,
        ratio: if base != 0.0 { value / base } else { f64::NAN },
    }
}

/// The hub process: `bench-hub URL`. Prints `ready` once listening; answers `echo` with the
/// payload, and `count N` once it has received N events (counting from the last `reset`).
pub fn hub_main(args: &[String]) -> std::process::ExitCode {
    let Some(url) = args.first().cloned() else {
        eprintln!("usage: bench-hub URL");
        return std::process::ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-hub: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // `bench-hub URL task` runs the hub's loop as a task of the runtime, as a server's handlers
    // run: a task woken by the link's reader runs on that reader's worker, no other thread to
    // wake. Without it the loop runs on `block_on`'s thread, woken through a futex per message,
    // which costs this VM 30-80 µs when the other vCPU idles (PERFORMANCE.md).
    let in_task = args.get(1).is_some_and(|a| a == "task");
    let r = rt.block_on(async move {
        if in_task {
            tokio::spawn(hub_loop(url))
                .await
                .map_err(|e| hivewire::TransportError::ConnectionError(e.to_string()))?
        } else {
            hub_loop(url).await
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-hub: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn hub_loop(url: String) -> Result<(), hivewire::TransportError> {
    {
        let hub = if let Some(name) = url.strip_prefix("shm://") {
            let info = hivewire::shm::SharedMemoryInfo { ring_buffer_size: RING, ..Default::default() };
            let cfg = TransportConfig { max_message_size: 12 << 20, ..TransportConfig::default() };
            hivewire::shm::SharedMemoryTransport::listen(name, "hub", cfg, info).await?
        } else {
            let cfg = TransportConfig { max_message_size: 12 << 20, ..TransportConfig::default() };
            hivewire::listen_with(&url, "hub", cfg).await?
        };
        println!("ready");
        let mut events = 0u64;
        let mut waiting: Option<(Message, u64)> = None;
        loop {
            let (_, m) = hub.receive().await?;
            match m.method() {
                Some("echo") => hub.respond_bytes(&m, m.payload.clone()).await?,
                Some("reset") => {
                    events = 0;
                    hub.respond(&m, &0u64).await?;
                }
                Some("count") => {
                    let n: u64 = m.payload_as()?;
                    if events >= n {
                        hub.respond(&m, &events).await?;
                    } else {
                        waiting = Some((m, n));
                    }
                }
                Some("quit") => {
                    // The requester may be gone already (the link-level client closes at once).
                    let _ = hub.respond(&m, &0u64).await;
                    break;
                }
                Some("flood") => {
                    // `flood (len, n)`: n events of len bytes to the requester, from a task.
                    let (len, n): (u64, u64) = m.payload_as()?;
                    let msg = Message::new("hub", MessageType::Event { topic: "flood".into() })
                        .with_payload_bytes(Bytes::from(vec![7u8; len as usize]));
                    let (hub, to) = (hub.clone(), m.source.clone());
                    tokio::spawn(async move {
                        if let Err(e) = crate::bench::send_from_task(&hub, &to, msg, n as usize).await {
                            eprintln!("bench-hub: flood failed: {e}");
                        }
                    });
                }
                Some(_) => {}
                None => {
                    events += 1;
                    if let Some((req, n)) = waiting.take() {
                        if events >= n {
                            hub.respond(&req, &events).await?;
                        } else {
                            waiting = Some((req, n));
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        hub.close().await;
        Ok(())
    }
}

struct HubProcess(Child, String);

impl Drop for HubProcess {
    fn drop(&mut self) {
        // Give the hub (told to quit) a moment to close cleanly, then make sure it is gone and
        // nothing of it stays in /dev/shm.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(name) = self.1.strip_prefix("shm://") {
            let _ = hivewire::shm::SharedMemoryTransport::cleanup(name);
        }
    }
}

fn spawn_hub(url: &str, in_task: bool) -> std::io::Result<HubProcess> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench-hub", url, if in_task { "task" } else { "block_on" }])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        return Err(std::io::Error::other(format!("bench-hub said {line:?}")));
    }
    Ok(HubProcess(child, url.to_string()))
}

/// Round trips and one-way rates against a hub in another process at `url`.
struct Measured {
    rtt: Vec<f64>,
    small: f64,
    large: Vec<(usize, f64)>,
}

/// With `in_task`, the hub's loop, the requester and the sender run as runtime tasks (see
/// `hub_main`), as the README tells applications to run their loops, and round trips and
/// one-way rates are measured; otherwise both sides run on their `block_on` threads and only
/// round trips are measured (the `request_response_2proc` rows).
async fn measure(
    url: &str,
    in_task: bool,
    iters: usize,
    n_small: u64,
    large: &[(usize, u64)],
) -> Result<Measured, String> {
    let _hub = spawn_hub(url, in_task).map_err(|e| e.to_string())?;
    let cfg = TransportConfig { max_message_size: 12 << 20, ..TransportConfig::default() };
    let a: Node = if let Some(name) = url.strip_prefix("shm://") {
        hivewire::shm::SharedMemoryTransport::connect(name, "a", cfg).await.map_err(|e| e.to_string())?
    } else {
        hivewire::connect_with(url, "a", cfg).await.map_err(|e| e.to_string())?
    };
    let wait = Duration::from_secs(120);
    let requester = a.clone();
    let round_trips = async move {
        let payload = Bytes::from(vec![7u8; SMALL]);
        let mut rtt = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let req = Message::new("a", MessageType::Request { method: "echo".into() })
                .with_payload_bytes(payload.clone());
            let t = Instant::now();
            requester.request_message("hub", req, wait).await.map_err(|e| e.to_string())?;
            if i >= iters / 10 {
                rtt.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok::<_, String>(rtt)
    };
    let rtt = if in_task {
        tokio::spawn(round_trips).await.map_err(|e| e.to_string())??
    } else {
        round_trips.await?
    };
    if !in_task {
        let _ = a.request("hub", "quit", &(), Duration::from_secs(5)).await;
        a.close().await;
        return Ok(Measured { rtt, small: f64::NAN, large: Vec::new() });
    }
    let one_way = |len: usize, n: u64| {
        let a = a.clone();
        async move {
            let msg = Message::new("a", MessageType::Event { topic: "bench".into() })
                .with_payload_bytes(Bytes::from(vec![7u8; len]));
            // Untimed warm-up: enough messages to pass once through the whole ring, so that
            // its pages and the receiver's buffers are faulted in before the clock starts
            // (the memcpy baseline is warmed up the same way).
            let warm = (RING / len + 1).min(n as usize);
            crate::bench::send_from_task(&a, "hub", msg.clone(), warm).await.map_err(|e| e.to_string())?;
            a.request("hub", "reset", &(), wait).await.map_err(|e| e.to_string())?;
            let start = Instant::now();
            crate::bench::send_from_task(&a, "hub", msg, n as usize).await.map_err(|e| e.to_string())?;
            a.request("hub", "count", &n, wait).await.map_err(|e| e.to_string())?;
            Ok::<f64, String>(n as f64 / start.elapsed().as_secs_f64())
        }
    };
    let small = if n_small > 0 { one_way(SMALL, n_small).await? } else { f64::NAN };
    let mut large_rates = Vec::new();
    for &(len, n) in large {
        large_rates.push((len, one_way(len, n).await? * len as f64 / 1e6));
    }
    let _ = a.request("hub", "quit", &(), Duration::from_secs(5)).await;
    a.close().await;
    Ok(Measured { rtt, small, large: large_rates })
}

/// What a client that speaks the protocol itself over the link measured.
struct LentMeasured {
    rtt: Vec<f64>,
    large: Vec<(usize, f64)>,
}

/// Round trips and hub-to-client rates of a client on the link itself (`dial_link`, the
/// handshake done here) that receives with `recv_lent`: each payload is lent from the ring
/// (no copy out), and each wait spins and parks on the calling task (no hand-off from a reader
/// task). The hub is the same `bench-hub` process, a `Node` whose loop runs as a task.
async fn measure_lent(url: &str, iters: usize, large: &[(usize, u64)]) -> Result<LentMeasured, String> {
    use hivewire::protocol::handshake::{ClientHandshake, HandshakeConfig};
    use hivewire_core::{LinkRx, LinkTx};

    let name = url.strip_prefix("shm://").ok_or("not an shm url")?;
    let _hub = spawn_hub(url, true).map_err(|e| e.to_string())?;
    let cfg = TransportConfig { max_message_size: 12 << 20, ..TransportConfig::default() };
    let hivewire_core::Link { mut tx, mut rx, .. } =
        hivewire::shm::SharedMemoryTransport::dial_link(name, &cfg).await.map_err(|e| e.to_string())?;
    // No compression offered: every frame is lendable.
    let mut hs = ClientHandshake::new(
        HandshakeConfig {
            agent_id: "lender".into(),
            version: hivewire::ProtocolVersion::CURRENT,
            capabilities: Vec::new(),
            metadata: Default::default(),
            timeout: Duration::from_secs(10),
        },
        Instant::now(),
    );
    let e = |e: hivewire::TransportError| e.to_string();
    tx.send_batch(&mut vec![hs.hello()]).await.map_err(e)?;
    let ack = rx.recv().await.map_err(e)?.ok_or("closed during the handshake")?;
    hs.handle(&ack).map_err(|e| e.to_string())?;
    let request = |method: &str, payload: Bytes| {
        Message::new("lender", MessageType::Request { method: method.into() })
            .with_payload_bytes(payload)
            .with_destination("hub")
    };
    let payload = Bytes::from(vec![7u8; SMALL]);
    let mut rtt = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        tx.send_batch(&mut vec![request("echo", payload.clone())]).await.map_err(e)?;
        loop {
            let m = rx.recv_lent().await.map_err(e)?.ok_or("closed")?;
            if m.message().is_response() {
                break;
            }
        }
        if i >= iters / 10 {
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let mut rates = Vec::new();
    for &(len, n) in large {
        let mut flood = async |n: u64| -> Result<f64, String> {
            let args = hivewire::protocol::encode_payload(&(len as u64, n)).map_err(|e| e.to_string())?;
            let start = Instant::now();
            tx.send_batch(&mut vec![request("flood", args)]).await.map_err(e)?;
            let mut got = 0;
            while got < n {
                let m = rx.recv_lent().await.map_err(e)?.ok_or("closed")?;
                if m.message().topic() == Some("flood") {
                    if m.payload().len() != len || !m.is_lent() {
                        return Err(format!(
                            "flood message of {} bytes, lent: {}",
                            m.payload().len(),
                            m.is_lent()
                        ));
                    }
                    got += 1;
                }
            }
            Ok(n as f64 * len as f64 / start.elapsed().as_secs_f64() / 1e6)
        };
        // Untimed warm-up through the whole ring, as for the other one-way rows.
        flood((RING / len + 1) as u64).await?;
        rates.push((len, flood(n).await?));
    }
    tx.send_batch(&mut vec![request("quit", Bytes::new())]).await.map_err(e)?;
    tx.close().await;
    Ok(LentMeasured { rtt, large: rates })
}

/// Two threads ping-ponging a counter in one cache line: the floor of a cross-core round trip.
fn atomic_pingpong(iters: usize) -> Vec<f64> {
    #[repr(align(64))]
    struct Line(AtomicU64);
    let line = Arc::new(Line(AtomicU64::new(0)));
    let other = line.clone();
    let total = (iters + iters / 10) as u64;
    let peer = std::thread::spawn(move || {
        for i in 0..total {
            while other.0.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            other.0.store(2 * i + 2, Ordering::Release);
        }
    });
    let mut samples = Vec::with_capacity(iters);
    for i in 0..total {
        let t = Instant::now();
        line.0.store(2 * i + 1, Ordering::Release);
        while line.0.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
        if i >= (iters / 10) as u64 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = peer.join();
    samples
}

/// memcpy bandwidth in MB/s for buffers of `len` bytes.
fn memcpy_mbs(len: usize, reps: usize) -> f64 {
    let src = vec![3u8; len];
    let mut dst = vec![0u8; len];
    // Warm-up: the destination's pages are faulted in before the clock starts.
    dst.copy_from_slice(&src);
    std::hint::black_box(&mut dst);
    let start = Instant::now();
    for i in 0..reps {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        dst[i % len] = 0;
    }
    (len * reps) as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// memcpy bandwidth in MB/s for `len`-byte copies into successive places of a `ring`-byte
/// buffer, as a sender copies messages into a ring larger than the caches: each copy lands on
/// memory not written since the ring last went round (the same-buffer baseline above copies
/// onto a destination the caches still hold).
fn memcpy_ring_mbs(len: usize, ring: usize, reps: usize) -> f64 {
    let src = vec![3u8; len];
    let mut dst = vec![0u8; ring + len];
    // Warm-up: every page of the destination is faulted in before the clock starts.
    dst.fill(1);
    std::hint::black_box(&mut dst);
    let step = len + 4096;
    let start = Instant::now();
    let mut at = 0;
    for _ in 0..reps {
        dst[at..at + len].copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        at = (at + step) % ring;
    }
    (len * reps) as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// The shm rows (`--scenario rtt|small|large` runs only those rows and their baselines).
pub async fn rows(opts: &BenchOpts) -> Vec<BenchRow> {
    if !opts.wants("shm") {
        return Vec::new();
    }
    let (iters, n_small, n_64k, n_10m) =
        if opts.quick { (2_000, 200_000u64, 5_000u64, 20u64) } else { (20_000, 1_000_000, 50_000, 100) };
    let (want_rtt, want_small, want_large) =
        (opts.wants_scenario("rtt"), opts.wants_scenario("small"), opts.wants_scenario("large"));
    let iters = if want_rtt { iters } else { 0 };
    let n_small = if want_small { n_small } else { 0 };
    let large: Vec<(usize, u64)> =
        if want_large { vec![(64 * 1024, n_64k), (10 << 20, n_10m)] } else { Vec::new() };
    let name = format!("shm://hwbench-{}", std::process::id());
    let mut out = Vec::new();
    // One-way rates come from the tasks runs (sender and hub loop as tasks, as for every other
    // backend's one-way rows); round trips are reported for both runtimes.
    let mut t = match measure(&format!("{name}-t"), true, iters, n_small, &large).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bench shm failed: {e}");
            return out;
        }
    };
    let dir = std::env::temp_dir().join(format!("hivewire-bench-shm-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let uds_url = format!("unix://{}", dir.join("hub.sock").display());
    let (mut fm, mut fp) = (f64::NAN, f64::NAN);
    if want_rtt {
        let mut floor = atomic_pingpong(iters);
        (fm, fp) = (median(&mut floor), percentile(&mut floor, 99.0));
    }
    let uds_tasks =
        if want_rtt || want_small { Some(measure(&uds_url, true, iters, n_small, &[]).await) } else { None };
    // Round trips with the requester and the hub's loop as runtime tasks.
    let scenario = "request_response_2proc_tasks";
    let m = median(&mut t.rtt);
    if want_rtt {
        out.push(row(scenario, SMALL, "rtt_median", m, "us", "atomic_pingpong_2threads", fm));
        let p = percentile(&mut t.rtt, 99.0);
        out.push(row(scenario, SMALL, "rtt_p99", p, "us", "atomic_pingpong_2threads", fp));
    }
    match uds_tasks {
        Some(Ok(mut u)) => {
            if want_rtt {
                let um = median(&mut u.rtt);
                out.push(row(scenario, SMALL, "rtt_median", m, "us", "uds_backend_2proc_tasks", um));
            }
            if want_small {
                let scenario = "one_way_event_2proc";
                out.push(row(
                    scenario,
                    SMALL,
                    "throughput",
                    t.small,
                    "msgs/s",
                    "uds_backend_2proc_tasks",
                    u.small,
                ));
            }
        }
        Some(Err(e)) => eprintln!("bench shm: the uds baseline (tasks) failed: {e}"),
        None => {}
    }
    let memcpy: Vec<(usize, f64)> = large
        .iter()
        .map(|&(len, _)| (len, memcpy_mbs(len, if len > 1 << 20 { 50 } else { 20_000 })))
        .collect();
    let memcpy_of = |len: usize| memcpy.iter().find(|m| m.0 == len).map_or(f64::NAN, |m| m.1);
    for &(len, mbs) in &t.large {
        out.push(row("one_way_event_2proc", len, "throughput", mbs, "MB/s", "memcpy", memcpy_of(len)));
        if len > 1 << 20 {
            // The same copy onto memory the caches no longer hold: the bound of a sender's copy
            // into a 32 MiB ring.
            let ring = memcpy_ring_mbs(len, RING, 50);
            out.push(row(
                "one_way_event_2proc",
                len,
                "throughput",
                mbs,
                "MB/s",
                "memcpy_into_32MiB_ring",
                ring,
            ));
        }
    }
    // A client on the link itself, receiving with `recv_lent` (zero copy) on this thread: no
    // reader task hands its messages over.
    if want_rtt || want_large {
        match measure_lent(&format!("{name}-l"), iters, &large).await {
            Ok(mut l) => {
                if want_rtt {
                    let scenario = "request_response_2proc_link_lent";
                    let (m, p) = (median(&mut l.rtt), percentile(&mut l.rtt, 99.0));
                    out.push(row(scenario, SMALL, "rtt_median", m, "us", "atomic_pingpong_2threads", fm));
                    out.push(row(scenario, SMALL, "rtt_p99", p, "us", "atomic_pingpong_2threads", fp));
                }
                for &(len, mbs) in &l.large {
                    let scenario = "hub_to_link_lent_2proc";
                    out.push(row(scenario, len, "throughput", mbs, "MB/s", "memcpy", memcpy_of(len)));
                }
            }
            Err(e) => eprintln!("bench shm (link, recv_lent) failed: {e}"),
        }
    }
    // Round trips with both loops on their `block_on` threads, beside uds the same way.
    if want_rtt {
        match (measure(&name, false, iters, 0, &[]).await, measure(&uds_url, false, iters, 0, &[]).await) {
            (Ok(shm), uds) => {
                let mut rtt = shm.rtt;
                let scenario = "request_response_2proc";
                let (m, p) = (median(&mut rtt), percentile(&mut rtt, 99.0));
                out.push(row(scenario, SMALL, "rtt_median", m, "us", "atomic_pingpong_2threads", fm));
                out.push(row(scenario, SMALL, "rtt_p99", p, "us", "atomic_pingpong_2threads", fp));
                match uds {
                    Ok(mut u) => out.push(row(
                        scenario,
                        SMALL,
                        "rtt_median",
                        m,
                        "us",
                        "uds_backend_2proc",
                        median(&mut u.rtt),
                    )),
                    Err(e) => eprintln!("bench shm: the uds baseline failed: {e}"),
                }
            }
            (Err(e), _) => eprintln!("bench shm (block_on) failed: {e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}
