//! The `hivewire` binary, run as a user would: real child processes on loopback.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_hivewire");
const WAIT: Duration = Duration::from_secs(20);

/// A `hivewire serve` child, killed on drop; its stdout lines arrive on a channel.
struct Hub {
    child: Child,
    url: String,
    lines: mpsc::Receiver<String>,
}

impl Hub {
    fn start(url: &str) -> Hub {
        let mut child = Command::new(BIN)
            .args(["--id", "hub", "serve", url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines.recv_timeout(WAIT).expect("serve printed nothing");
        let url = first
            .strip_prefix("listening on ")
            .and_then(|r| r.split(" as ").next())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Hub { child, url, lines }
    }

    fn wait_for(&self, needle: &str) {
        loop {
            let line =
                self.lines.recv_timeout(WAIT).unwrap_or_else(|_| panic!("serve never printed {needle:?}"));
            if line.contains(needle) {
                return;
            }
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Output {
    let mut child =
        Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("hivewire {args:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[test]
fn serve_and_request_echo_over_tcp() {
    let hub = Hub::start("tcp://127.0.0.1:0");
    let o = run(&["request", &hub.url, "--to", "hub", "echo", r#"{"x":1}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), r#"{"x":1}"#);
}

#[test]
fn unknown_method_is_an_error_response() {
    let hub = Hub::start("tcp://127.0.0.1:0");
    let o = run(&["request", &hub.url, "--to", "hub", "launch", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("hivewire: error 501"), "{}", stderr(&o));
}

#[test]
fn bad_url_refused_connection_and_bad_json_fail_in_one_line() {
    let bad = run(&["request", "carrier://x", "--to", "hub", "echo", "1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).starts_with("hivewire: invalid URL"), "{}", stderr(&bad));
    assert_eq!(stderr(&bad).lines().count(), 1);

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = run(&["request", &format!("tcp://127.0.0.1:{port}"), "--to", "hub", "echo", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("cannot connect"), "{}", stderr(&refused));

    let hub = Hub::start("tcp://127.0.0.1:0");
    let json = run(&["request", &hub.url, "--to", "hub", "echo", "{bad"]);
    assert_eq!(json.status.code(), Some(1));
    assert!(stderr(&json).contains("not valid JSON"), "{}", stderr(&json));
}

#[test]
fn subscribe_receives_what_publish_sends() {
    let hub = Hub::start("tcp://127.0.0.1:0");
    let sub = Command::new(BIN)
        .args(["--id", "listener", "subscribe", &hub.url, "news.*", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn subscribe");
    hub.wait_for("peer up: listener");
    std::thread::sleep(Duration::from_millis(200));
    let p = run(&["publish", &hub.url, "news.today", r#"{"n":7}"#]);
    assert!(p.status.success(), "{}", stderr(&p));
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(sub.wait_with_output());
    });
    let out = rx.recv_timeout(WAIT).expect("subscribe did not finish").expect("output");
    assert!(out.status.success(), "{}", stderr(&out));
    let line: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("one JSON line");
    assert_eq!(line["topic"], "news.today");
    assert_eq!(line["payload"], serde_json::json!({"n": 7}));
}

#[test]
fn serve_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("hub.sock").display());
    let hub = Hub::start(&url);
    let o = run(&["request", &hub.url, "--to", "hub", "echo", "[1,2,3]"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[1,2,3]");
}

#[test]
fn serve_over_websocket_with_a_path() {
    let hub = Hub::start("ws://127.0.0.1:0/swarm");
    assert!(hub.url.starts_with("ws://127.0.0.1:") && hub.url.ends_with("/swarm"), "{}", hub.url);
    let o = run(&["request", &hub.url, "--to", "hub", "echo", r#""hi""#]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), r#""hi""#);
    // The wrong path is refused with the listener's reason, in one line.
    let wrong = hub.url.replace("/swarm", "/elsewhere");
    let o = run(&["request", &wrong, "--to", "hub", "echo", "1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("404") && err.lines().count() == 1, "{err}");
}

#[test]
fn serve_over_shared_memory() {
    let url = format!("shm://hwcli-{}-{}", std::process::id(), fastrand::u32(..));
    let hub = Hub::start(&url);
    assert_eq!(hub.url, url);
    let o = run(&["request", &hub.url, "--to", "hub", "echo", r#"{"over":"shm"}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), r#"{"over":"shm"}"#);
    // The hub is killed, as a user's Ctrl-C or a crash would; its name is then reclaimable and
    // nothing of it stays in /dev/shm.
    drop(hub);
    let name = url.trim_start_matches("shm://");
    hivewire_shm::SharedMemoryTransport::cleanup(name).expect("cleanup after a dead hub");
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!left.iter().any(|f| f.starts_with(&format!("hw-{name}"))), "left in /dev/shm: {left:?}");
}

#[test]
fn serve_over_udp() {
    let hub = Hub::start("udp://127.0.0.1:0");
    let o = run(&["request", &hub.url, "--to", "hub", "echo", "[4,5]"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[4,5]");
}
