//! The JavaScript client of `clients/js` in a real browser: Debian's headless Chromium loads a
//! page served over HTTP on loopback, connects to a hivewire WebSocket hub (origin allow-list and
//! bearer token on), completes the handshake, gets an `echo` response, sees a request time out,
//! receives a published event, answers a request from the hub, and reports all of it back with a
//! `report` request that this test checks.
//!
//! Needs `chromium` (`apt-get install chromium`) and `npm ci` in `clients/js`. `.ci/run` installs
//! both and sets `HIVEWIRE_REQUIRE_BROWSER=1`, which turns their absence into a failure; without
//! it the test says what is missing and returns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hivewire_core::{Node, TransportConfig};
use hivewire_ws::{WebSocketTransport, WsMode, WsOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "browser-s3cret";

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/js")
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HIVEWIRE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Serves the client, the test page and the msgpack module from `clients/js`.
async fn serve_page(listener: TcpListener) {
    let root = js_dir();
    loop {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let root = root.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() {
                match s.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let path =
                head.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
            let file = match path.as_str() {
                "/" | "/index.html" => Some(root.join("test/index.html")),
                "/hivewire.js" => Some(root.join("hivewire.js")),
                "/test/browser-test.js" => Some(root.join("test/browser-test.js")),
                p if p.starts_with("/msgpack/") && !p.contains("..") => {
                    Some(root.join("node_modules/@msgpack/msgpack/dist.esm").join(&p["/msgpack/".len()..]))
                }
                _ => None,
            };
            let body = file.and_then(|f| std::fs::read(&f).ok().map(|b| (f, b)));
            let response = match body {
                Some((f, b)) => {
                    let ctype = match f.extension().and_then(|e| e.to_str()) {
                        Some("html") => "text/html; charset=utf-8",
                        Some("js" | "mjs") => "text/javascript; charset=utf-8",
                        _ => "application/octet-stream",
                    };
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&b);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            let _ = s.write_all(&response).await;
            let _ = s.shutdown().await;
        });
    }
}

/// The hub's side of the page's script; returns the page's report.
async fn answer_page(hub: Node) -> Value {
    loop {
        let (from, req) = hub.receive().await.expect("hub inbox");
        let Some(method) = req.method().map(str::to_string) else { continue };
        match method.as_str() {
            "echo" => hub.respond_bytes(&req, req.payload.clone()).await.unwrap(),
            "never-answered" => {}
            "publish" => {
                let v: Value = req.payload_as().unwrap();
                hub.publish(v["topic"].as_str().unwrap(), &v["value"]).await.unwrap();
                hub.respond(&req, &true).await.unwrap();
            }
            "call-me-back" => {
                let n: i64 = req.payload_as().unwrap();
                let hub2 = hub.clone();
                tokio::spawn(async move {
                    let r = hub2.request(from.as_str(), "double", &n, Duration::from_secs(10)).await;
                    match r {
                        Ok(resp) => hub2.respond(&req, &resp.payload_as::<Value>().unwrap()).await.unwrap(),
                        Err(e) => hub2.respond_error(&req, 500, &e.to_string()).await.unwrap(),
                    }
                });
            }
            "report" => {
                let v: Value = req.payload_as().unwrap();
                hub.respond(&req, &true).await.unwrap();
                return v;
            }
            other => hub.respond_error(&req, 404, &format!("no method {other}")).await.unwrap(),
        }
    }
}

struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_works_in_headless_chromium() {
    let required = std::env::var_os("HIVEWIRE_REQUIRE_BROWSER").is_some_and(|v| v == "1");
    let missing = match chromium() {
        None => Some("chromium is not installed (apt-get install chromium)".to_string()),
        Some(_) if !js_dir().join("node_modules/@msgpack/msgpack/dist.esm/index.mjs").exists() => {
            Some("clients/js has no node_modules (run `npm ci` there)".to_string())
        }
        Some(_) => None,
    };
    if let Some(why) = missing {
        assert!(!required, "HIVEWIRE_REQUIRE_BROWSER=1 but {why}");
        eprintln!("browser test not run: {why}; set HIVEWIRE_REQUIRE_BROWSER=1 to make this a failure");
        return;
    }
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_origin = format!("http://127.0.0.1:{}", page_listener.local_addr().unwrap().port());
    tokio::spawn(serve_page(page_listener));

    let opts = WsOptions {
        path: "/hivewire".into(),
        allowed_origins: Some(vec![page_origin.clone()]),
        bearer_token: Some(TOKEN.into()),
        ..WsOptions::default()
    };
    let hub = WebSocketTransport::with_options(
        WsMode::Server { bind_addr: "127.0.0.1:0".into() },
        "hub",
        TransportConfig::default(),
        opts,
    )
    .await
    .unwrap();
    let hub_url = hub.listen_url().unwrap();
    let page = format!("{page_origin}/?hub={hub_url}&token={TOKEN}");

    let profile = tempfile::tempdir().unwrap();
    let log_path = profile.path().join("chromium.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(chromium().unwrap())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().join("profile").display()))
        .arg(&page)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start chromium");
    let _browser = Browser(child);

    let report = match tokio::time::timeout(WAIT, answer_page(hub.clone())).await {
        Ok(r) => r,
        Err(_) => {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!("the page never reported within {WAIT:?}; chromium's log ends with:\n{}", tail.join("\n"));
        }
    };
    eprintln!("page report: {report}");
    assert_eq!(report["ok"], json!(true), "the page reported a failure: {report:#}");
    assert_eq!(report["steps"], json!(["handshake", "echo", "timeout", "event", "callback"]));
    assert_eq!(report["hub"], json!("hub"));
    assert_eq!(report["echo"], json!({"n": 42, "s": "héllo", "list": [1, 2, 3]}));
    assert_eq!(report["timeout"], json!("timed out"));
    assert_eq!(report["event"], json!({"topic": "news.today", "value": {"headline": "hello browser"}}));
    assert_eq!(report["callback"], json!({"method": "double", "doubled": 42}));
    assert_eq!(report["matcher"], json!([true, true, false]));
    // The hub saw the browser's origin and token at the upgrade.
    let info = hub.peer_info("browser").expect("browser still connected");
    assert_eq!(info.attributes.get(hivewire_ws::ORIGIN_ATTR), Some(&page_origin));
    assert_eq!(info.attributes.get(hivewire_ws::TOKEN_ATTR).map(String::as_str), Some(TOKEN));
    hub.close().await;
}
