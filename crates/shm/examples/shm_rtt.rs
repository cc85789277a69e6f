//! Rough figures for the shared-memory backend (not a benchmark harness: see `cargo xtask
//! bench`): same-process 64 B request/response round trip, and the CPU an idle link uses.
//!
//! `cargo run --release -p hivewire-shm --example shm_rtt`

use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire_core::{Message, Node, TransportConfig};
use hivewire_shm::{SharedMemoryInfo, SharedMemoryTransport};

fn cpu_time() -> Duration {
    // utime + stime of this process, in clock ticks (fields 14 and 15 of /proc/self/stat).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // After the ')' the fields start at 3 (state, non-numeric, skipped by the parse filter).
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), hivewire_core::TransportError> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "serve" {
        // Child: an echoing hub on shm://NAME until stdin closes.
        let hub = SharedMemoryTransport::listen(
            &args[2],
            "hub",
            TransportConfig::default(),
            SharedMemoryInfo::default(),
        )
        .await?;
        let responder = hub.clone();
        tokio::spawn(async move {
            while let Ok((_, req)) = responder.receive().await {
                let _ = responder.respond_bytes(&req, req.payload.clone()).await;
            }
        });
        println!("READY");
        let _ =
            tokio::task::spawn_blocking(|| std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1])).await;
        hub.close().await;
        return Ok(());
    }
    {
        use std::io::BufRead;
        let name = format!("rtt-x-{}", std::process::id());
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", &name])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let agent = SharedMemoryTransport::connect(&name, "agent", TransportConfig::default()).await?;
        rtt_only("shm, two processes", &agent).await?;
        agent.close().await;
        drop(child.stdin.take());
        let _ = child.wait();
    }
    let name = format!("rtt-{}", std::process::id());
    let hub =
        SharedMemoryTransport::listen(&name, "hub", TransportConfig::default(), SharedMemoryInfo::default())
            .await?;
    let agent = SharedMemoryTransport::connect(&name, "agent", TransportConfig::default()).await?;
    rtt("shm, same process", &hub, &agent).await?;
    {
        let path = std::env::temp_dir().join(format!("hw-rtt-{}.sock", std::process::id()));
        let path = path.to_str().unwrap_or("hw-rtt.sock");
        let uhub =
            hivewire_uds::UdsTransport::listen(path, "hub", TransportConfig::default(), Default::default())
                .await?;
        let uagent = hivewire_uds::UdsTransport::connect(path, "agent", TransportConfig::default()).await?;
        rtt("uds, same process (baseline)", &uhub, &uagent).await?;
        uagent.close().await;
        uhub.close().await;
    }
    // Idle: one connected link, nothing sent (the engine's heartbeats still run).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (c1, t1) = (cpu_time(), Instant::now());
    println!(
        "idle link (hub + agent in one process): {:.2}% of one core over {:?}",
        (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64() * 100.0,
        t1 - t0
    );
    agent.close().await;
    hub.close().await;
    Ok(())
}

async fn rtt(label: &str, hub: &Node, agent: &Node) -> Result<(), hivewire_core::TransportError> {
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            let _ = responder.respond_bytes(&req, req.payload.clone()).await;
        }
    });
    rtt_only(label, agent).await
}

async fn rtt_only(label: &str, agent: &Node) -> Result<(), hivewire_core::TransportError> {
    let payload = Bytes::from(vec![7u8; 64]);
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..22_000 {
        let req = Message::request("agent", "echo", &())?.with_payload_bytes(payload.clone());
        let t = Instant::now();
        agent.request_message("hub", req, Duration::from_secs(5)).await?;
        if i >= 2_000 {
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{label}: 64 B request/response round trip median {:?}, p99 {:?} ({} samples)",
        pct(0.5),
        pct(0.99),
        samples.len()
    );
    Ok(())
}
