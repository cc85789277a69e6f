//! `hivewire`: a hub and a client for any backend, by URL.
//!
//! ```text
//! hivewire serve tcp://127.0.0.1:7000
//! hivewire request tcp://127.0.0.1:7000 --to <hub id> echo '{"x":1}'
//! hivewire subscribe tcp://127.0.0.1:7000 'sensors.*'
//! hivewire publish tcp://127.0.0.1:7000 sensors.arm '{"celsius":41.5}'
//! hivewire send tcp://127.0.0.1:7000 --to <agent> --topic note '"hello"'
//! ```
//!
//! DATA is JSON on the command line and travels as MessagePack. Errors print one line,
//! `hivewire: …`, and exit with status 1.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hivewire::protocol::{decode_payload, error_codes};
use hivewire::{Message, MessageType, Node, PeerEvent, TlsConfig, TransportConfig, TransportError};
use tracing_subscriber::EnvFilter;

/// One messaging API for swarms of agents: a hub and a client for any backend URL.
#[derive(Debug, Parser)]
#[command(name = "hivewire", version, about)]
struct Cli {
    /// Log filter (tracing env-filter syntax), written to stderr.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// This agent's id (default: a random one).
    #[arg(long, global = true)]
    id: Option<String>,
    /// Time allowed to connect and for a request, in milliseconds.
    #[arg(long, global = true, default_value_t = 5000)]
    timeout_ms: u64,
    /// TLS certificate chain (PEM) of a listener.
    #[arg(long, global = true)]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of a listener.
    #[arg(long, global = true)]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) a client verifies the server with (and a listener its clients
    /// with, together with --tls-require-client-cert).
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true)]
    tls_client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true)]
    tls_client_key: Option<PathBuf>,
    /// A listener requires client certificates signed by --tls-ca.
    #[arg(long, global = true)]
    tls_require_client_cert: bool,
    /// Accept any server certificate (no protection against an active attacker).
    #[arg(long, global = true)]
    tls_insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub on URL: it routes between its peers and answers `echo` with the payload.
    Serve {
        /// Where to listen, e.g. tcp://127.0.0.1:7000, unix:///tmp/hub.sock, inproc://name.
        url: String,
    },
    /// Send a directed event.
    Send {
        /// The hub to connect to.
        url: String,
        /// The agent to send to.
        #[arg(long)]
        to: String,
        /// The event's topic.
        #[arg(long)]
        topic: String,
        /// The payload, as JSON.
        data: String,
    },
    /// Call METHOD on an agent and print the response payload as JSON.
    Request {
        /// The hub to connect to.
        url: String,
        /// The agent to call.
        #[arg(long)]
        to: String,
        /// The method.
        method: String,
        /// The payload, as JSON.
        data: String,
    },
    /// Print events matching PATTERN, one JSON line each.
    Subscribe {
        /// The hub to connect to.
        url: String,
        /// Topic pattern: `*` one segment, trailing `**` one or more.
        pattern: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publish an event to the agents subscribed to TOPIC.
    Publish {
        /// The hub to connect to.
        url: String,
        /// The topic.
        topic: String,
        /// The payload, as JSON.
        data: String,
    },
}

/// Why the command failed: printed as one line.
#[derive(Debug)]
struct Failure(String);

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Self {
        Failure(e.to_string())
    }
}

fn json(data: &str) -> Result<serde_json::Value, Failure> {
    serde_json::from_str(data).map_err(|e| Failure(format!("DATA is not valid JSON: {e}")))
}

fn payload_json(m: &Message) -> serde_json::Value {
    decode_payload::<serde_json::Value>(&m.payload)
        .unwrap_or_else(|_| serde_json::Value::String(m.payload.iter().map(|b| format!("{b:02x}")).collect()))
}

fn read(path: &Option<PathBuf>, what: &str) -> Result<Option<Vec<u8>>, Failure> {
    path.as_ref()
        .map(|p| std::fs::read(p).map_err(|e| Failure(format!("cannot read {what} {}: {e}", p.display()))))
        .transpose()
}

fn config(cli: &Cli) -> Result<TransportConfig, Failure> {
    Ok(TransportConfig {
        connection_timeout_ms: cli.timeout_ms,
        request_timeout_ms: cli.timeout_ms,
        tls: TlsConfig {
            cert_chain_pem: read(&cli.tls_cert, "--tls-cert")?,
            key_pem: read(&cli.tls_key, "--tls-key")?,
            ca_pem: read(&cli.tls_ca, "--tls-ca")?,
            client_cert_pem: read(&cli.tls_client_cert, "--tls-client-cert")?,
            client_key_pem: read(&cli.tls_client_key, "--tls-client-key")?,
            require_client_cert: cli.tls_require_client_cert,
            dangerous_accept_any_server_certificate: cli.tls_insecure,
            ..TlsConfig::default()
        },
        ..TransportConfig::default()
    })
}

fn agent_id(cli: &Cli) -> hivewire::AgentId {
    cli.id.clone().map(Into::into).unwrap_or_else(hivewire::random_agent_id)
}

async fn serve(cli: &Cli, url: &str) -> Result<(), Failure> {
    let hub = hivewire::listen_with(url, agent_id(cli), config(cli)?).await?;
    println!("listening on {} as {}", hub.listen_url().unwrap_or_else(|| url.to_string()), hub.agent_id());
    let mut events = hub.peer_events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(PeerEvent::Up { agent, .. }) => println!("peer up: {agent}"),
                Ok(PeerEvent::Down { agent, reason }) => println!("peer down: {agent} ({reason})"),
                Ok(PeerEvent::Rejected { agent, reason }) => println!("peer rejected: {agent} ({reason})"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    println!("({n} peer events skipped)")
                }
                Err(_) => break,
            }
        }
    });
    let responder = hub.clone();
    let serving = async move {
        while let Ok((from, m)) = responder.receive().await {
            if let MessageType::Request { method } = &m.kind {
                let r = if method == "echo" {
                    responder.respond_bytes(&m, m.payload.clone()).await
                } else {
                    responder
                        .respond_error(&m, error_codes::UNKNOWN_METHOD, &format!("unknown method {method:?}"))
                        .await
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "could not answer {from}");
                }
            } else {
                let line = serde_json::json!({
                    "from": from.as_str(),
                    "type": m.kind.name(),
                    "topic": m.topic(),
                    "payload": payload_json(&m),
                });
                println!("{line}");
            }
        }
    };
    tokio::select! {
        _ = serving => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    hub.close().await;
    Ok(())
}

async fn connect(cli: &Cli, url: &str) -> Result<Node, Failure> {
    Ok(hivewire::connect_with(url, agent_id(cli), config(cli)?).await?)
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let timeout = Duration::from_millis(cli.timeout_ms);
    match &cli.command {
        Command::Serve { url } => serve(cli, url).await,
        Command::Send { url, to, topic, data } => {
            let value = json(data)?;
            let node = connect(cli, url).await?;
            let msg = Message::event(node.agent_id().clone(), topic.as_str(), &value)
                .map_err(|e| Failure(e.to_string()))?;
            let r = node.send(to, msg).await;
            let flushed = node.barrier(timeout).await;
            node.close().await;
            r?;
            flushed?;
            Ok(())
        }
        Command::Request { url, to, method, data } => {
            let value = json(data)?;
            let node = connect(cli, url).await?;
            let r = node.request(to.as_str(), method, &value, timeout).await;
            node.close().await;
            match r {
                Ok(resp) => {
                    println!("{}", payload_json(&resp));
                    Ok(())
                }
                Err(TransportError::RequestFailed { code, message }) => {
                    Err(Failure(format!("error {code}: {message}")))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Subscribe { url, pattern, count } => {
            let node = connect(cli, url).await?;
            let mut sub = node.subscribe(pattern).await?;
            let mut seen = 0u64;
            let outcome = loop {
                if count.is_some_and(|c| seen >= c) {
                    break Ok(());
                }
                tokio::select! {
                    m = sub.recv() => match m {
                        Some(m) => {
                            seen += 1;
                            let line = serde_json::json!({
                                "topic": m.topic(),
                                "from": m.source.as_str(),
                                "payload": payload_json(&m),
                            });
                            println!("{line}");
                        }
                        None => break Err(Failure("the connection closed".into())),
                    },
                    _ = tokio::signal::ctrl_c() => break Ok(()),
                }
            };
            drop(sub);
            node.close().await;
            outcome
        }
        Command::Publish { url, topic, data } => {
            let value = json(data)?;
            let node = connect(cli, url).await?;
            // Let the hub's subscriptions arrive before publishing, and flush after.
            let _ = node.barrier(timeout).await;
            let r = node.publish(topic, &value).await;
            let flushed = node.barrier(timeout).await;
            node.close().await;
            r?;
            flushed?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hivewire: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(why)) => {
            eprintln!("hivewire: {why}");
            ExitCode::FAILURE
        }
    }
}
