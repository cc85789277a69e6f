//! The behaviour every hivewire backend must show, written once and run against each backend.
//!
//! A backend is described by a [`BackendFactory`]: how to start a hub, how to dial it, how to
//! open a raw link that speaks the protocol by hand (for misbehaving-peer scenarios), and the
//! [`Capabilities`] it declares. [`run_suite`] runs every scenario and returns one
//! [`ScenarioReport`] each: pass, fail with the reason, or skip — and a scenario is skipped only
//! where the backend *declares* the capability it needs absent.
//!
//! `cargo xtask conformance` runs the suite for [`all_backends`] and prints the matrix; the
//! integration tests of this crate run it under `cargo test`.
//!
//! ```no_run
//! # async fn demo() {
//! for backend in hivewire_conformance::all_backends() {
//!     for report in hivewire_conformance::run_suite(backend.clone(), None).await {
//!         println!("{} {}: {:?}", backend.name(), report.scenario, report.outcome);
//!     }
//! }
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hivewire_core::{Message, Node, TransportConfig, TransportError};

mod backends;
mod scenarios;

pub use backends::DuplexBackend;
#[cfg(feature = "inproc")]
pub use backends::InprocBackend;
#[cfg(feature = "quic")]
pub use backends::QuicBackend;
#[cfg(feature = "shm")]
pub use backends::ShmBackend;
#[cfg(feature = "tcp")]
pub use backends::TcpBackend;
#[cfg(feature = "tls")]
pub use backends::TlsBackend;
#[cfg(feature = "udp")]
pub use backends::UdpBackend;
#[cfg(feature = "uds")]
pub use backends::UdsBackend;
#[cfg(feature = "ws")]
pub use backends::WsBackend;

/// A boxed future, as factories return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The result of one scenario on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The behaviour is as specified.
    Pass,
    /// It is not; the reason says how.
    Fail(String),
    /// Not applicable: the backend declares the needed capability absent (the reason says which).
    Skip(String),
}

/// One scenario's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioReport {
    /// The scenario's name (see [`scenario_names`]).
    pub scenario: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// What a backend declares about itself; scenarios that need an absent capability are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Every accepted message arrives (or the link fails).
    pub reliable: bool,
    /// Messages between two agents arrive in the order sent.
    pub ordered: bool,
    /// Largest payload the backend can carry.
    pub max_message_size: usize,
    /// Agents may live in different processes.
    pub cross_process: bool,
    /// Messages cross as bytes through the codec, so negotiated compression applies.
    pub carries_bytes: bool,
    /// A dialing node redials its hub when the link drops.
    pub redials: bool,
}

/// A raw link to a hub, with no engine behind it: the scenario speaks the protocol itself.
pub trait RawPeer: Send {
    /// Sends one message.
    fn send(&mut self, msg: Message) -> BoxFuture<'_, Result<(), TransportError>>;
    /// Receives one message; `None` when the hub closed the link.
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Message>, TransportError>>;
}

/// How to run a backend, for the suite.
pub trait BackendFactory: Send + Sync {
    /// The backend's name (a column of the matrix).
    fn name(&self) -> &'static str;
    /// What it declares.
    fn capabilities(&self) -> Capabilities;
    /// Starts a hub named `agent_id` on a fresh address; returns it and the address to dial.
    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>>;
    /// Starts a hub on a given `address` (one [`listen`](Self::listen) returned earlier), e.g. to
    /// restart a hub where its clients will redial.
    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>>;
    /// Dials the hub at `address` as `agent_id`; returns after the handshake.
    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>>;
    /// Opens a raw link to the hub at `address`.
    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>>;
}

/// Every backend compiled into this crate (one cargo feature each), plus `duplex`: the engine
/// and codec over an in-memory byte stream, which exercises the byte path (framing,
/// compression) independently of any socket.
pub fn all_backends() -> Vec<Arc<dyn BackendFactory>> {
    let inproc: Option<Arc<dyn BackendFactory>> = {
        #[cfg(feature = "inproc")]
        {
            Some(Arc::new(InprocBackend))
        }
        #[cfg(not(feature = "inproc"))]
        {
            None
        }
    };
    let mut v: Vec<Arc<dyn BackendFactory>> = inproc.into_iter().collect();
    #[cfg(feature = "tcp")]
    v.push(Arc::new(TcpBackend));
    #[cfg(feature = "tls")]
    match TlsBackend::new() {
        Ok(b) => v.push(Arc::new(b)),
        Err(e) => tracing::error!(error = %e, "cannot generate the TLS test certificates; tls not run"),
    }
    #[cfg(feature = "uds")]
    v.push(Arc::new(UdsBackend::default()));
    #[cfg(feature = "ws")]
    {
        v.push(Arc::new(WsBackend::plain()));
        match WsBackend::secure() {
            Ok(b) => v.push(Arc::new(b)),
            Err(e) => tracing::error!(error = %e, "cannot generate the TLS test certificates; wss not run"),
        }
    }
    #[cfg(feature = "quic")]
    match QuicBackend::new() {
        Ok(b) => v.push(Arc::new(b)),
        Err(e) => tracing::error!(error = %e, "cannot generate the TLS test certificates; quic not run"),
    }
    #[cfg(feature = "udp")]
    v.push(Arc::new(UdpBackend));
    #[cfg(feature = "shm")]
    v.push(Arc::new(ShmBackend));
    v.push(Arc::new(DuplexBackend::default()));
    v
}

/// The names of all scenarios, in the order they run.
pub fn scenario_names() -> Vec<&'static str> {
    scenarios::ALL.iter().map(|e| e.name).collect()
}

/// Longest a single scenario may run before it is failed as hung.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs every scenario (or only `only_scenario`) against `backend`, one after another. Needs a
/// multi-threaded tokio runtime.
pub async fn run_suite(backend: Arc<dyn BackendFactory>, only_scenario: Option<&str>) -> Vec<ScenarioReport> {
    let mut out = Vec::new();
    for entry in scenarios::ALL {
        let name = entry.name;
        if only_scenario.is_some_and(|o| o != name) {
            continue;
        }
        let b = backend.clone();
        let fut = async move { entry.run(b).await };
        let outcome = match tokio::time::timeout(SCENARIO_TIMEOUT, tokio::spawn(fut)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => Outcome::Fail(format!("scenario panicked: {join}")),
            Err(_) => Outcome::Fail(format!("scenario did not finish within {SCENARIO_TIMEOUT:?}")),
        };
        tracing::info!(backend = backend.name(), scenario = name, ?outcome, "scenario done");
        out.push(ScenarioReport { scenario: name, outcome });
    }
    out
}
