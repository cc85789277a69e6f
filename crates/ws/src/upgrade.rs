//! The listener's side of the HTTP upgrade: the request head is read and checked here, before
//! tungstenite sees it, so that every refusal is a clear HTTP status with a one-line reason
//! (a plain GET gets 426, a wrong path 404, a foreign origin 403, a missing subprotocol 400, a
//! bad token 401, a full server 503) instead of a dropped connection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::{WsOptions, SUBPROTOCOL, TOKEN_QUERY_PARAM};

/// The largest request head accepted (request line and headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// At most this many headers in a request head.
const MAX_HEADERS: usize = 64;

/// What an accepted upgrade request carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Upgrade {
    pub(crate) path: String,
    pub(crate) origin: Option<String>,
    pub(crate) token: Option<String>,
}

/// Why an upgrade request was refused: the HTTP status and the reason sent in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal { status, reason: reason.into() }
    }
}

/// Reads bytes until the end of an HTTP request head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes
/// and `timeout`. Returns everything read (the head and anything after it).
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Vec<u8>, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 2048];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| Refusal::new(400, e.to_string()))?;
            if n == 0 {
                return Err(Refusal::new(400, "connection closed inside the request head"));
            }
            let from = buf.len().saturating_sub(3);
            buf.extend_from_slice(&chunk[..n]);
            if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(());
            }
            if buf.len() > MAX_HEAD {
                return Err(Refusal::new(431, format!("request head over {MAX_HEAD} bytes")));
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(r)) => Err(r),
        Err(_) => Err(Refusal::new(408, "request head not received in time")),
    }
}

fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
}

fn has_token(list: Option<&str>, wanted: &str) -> bool {
    list.is_some_and(|l| l.split(',').any(|t| t.trim().eq_ignore_ascii_case(wanted)))
}

/// Compares without an early exit, so the time taken does not tell how much of a token matched.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Checks an upgrade request head against the listener's policy, in this order: a parsable
/// HTTP/1.1 GET, a WebSocket upgrade, the path, the origin, the subprotocol, the token.
pub(crate) fn check(head: &[u8], opts: &WsOptions) -> Result<Upgrade, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::new(400, "incomplete request head")),
        Err(e) => return Err(Refusal::new(400, format!("malformed request: {e}"))),
    }
    if req.method != Some("GET") {
        return Err(Refusal::new(405, "only GET can be upgraded to a WebSocket"));
    }
    let h = req.headers;
    if !has_token(header(h, "upgrade"), "websocket") || !has_token(header(h, "connection"), "upgrade") {
        return Err(Refusal::new(426, "this endpoint speaks WebSocket only (Upgrade: websocket)"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != opts.path {
        return Err(Refusal::new(404, format!("no WebSocket endpoint at {path}")));
    }
    let origin = header(h, "origin").map(str::to_string);
    if let (Some(allowed), Some(o)) = (&opts.allowed_origins, &origin) {
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(o)) {
            return Err(Refusal::new(403, format!("origin {o} is not allowed")));
        }
    }
    if !has_token(header(h, "sec-websocket-protocol"), SUBPROTOCOL) {
        return Err(Refusal::new(400, format!("the subprotocol {SUBPROTOCOL} must be offered")));
    }
    let token = header(h, "authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().to_string())
        .or_else(|| query_param(query, TOKEN_QUERY_PARAM));
    if let Some(expected) = &opts.bearer_token {
        match &token {
            Some(t) if same_secret(t, expected) => {}
            Some(_) => return Err(Refusal::new(401, "bad bearer token")),
            None => return Err(Refusal::new(401, "a bearer token is required")),
        }
    }
    Ok(Upgrade { path: path.to_string(), origin, token })
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes the refusal as an HTTP response and closes the stream (best effort).
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) {
    let mut extra = String::new();
    match refusal.status {
        426 => extra.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"),
        401 => extra.push_str("WWW-Authenticate: Bearer\r\n"),
        405 => extra.push_str("Allow: GET\r\n"),
        _ => {}
    }
    let body = format!("{}\n", refusal.reason);
    let response = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        refusal.status,
        status_text(refusal.status),
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

/// A stream that first replays bytes already read from it (the request head), so tungstenite
/// can parse the head that [`check`] accepted.
#[derive(Debug)]
pub(crate) struct Replay<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub(crate) fn new(head: Vec<u8>, inner: S) -> Self {
        Replay { head, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.head.len() {
            let n = (this.head.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: &str) -> Vec<u8> {
        format!(
            "GET /hw?x=1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    fn opts() -> WsOptions {
        WsOptions { path: "/hw".into(), ..WsOptions::default() }
    }

    #[test]
    fn a_good_request_passes_and_carries_origin_and_token() {
        let o = WsOptions { bearer_token: Some("s3cret".into()), ..opts() };
        let up = check(
            &req("Sec-WebSocket-Protocol: chat, hivewire.v1\r\nOrigin: http://a\r\nAuthorization: Bearer s3cret\r\n"),
            &o,
        )
        .unwrap();
        assert_eq!(
            up,
            Upgrade { path: "/hw".into(), origin: Some("http://a".into()), token: Some("s3cret".into()) }
        );
    }

    #[test]
    fn each_policy_has_its_status() {
        let sp = "Sec-WebSocket-Protocol: hivewire.v1\r\n";
        let plain = b"GET /hw HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check(plain, &opts()).unwrap_err().status, 426);
        assert_eq!(check(b"POST /hw HTTP/1.1\r\n\r\n", &opts()).unwrap_err().status, 405);
        assert_eq!(check(b"\x00\x01garbage\r\n\r\n", &opts()).unwrap_err().status, 400);
        let wrong_path = WsOptions { path: "/other".into(), ..opts() };
        assert_eq!(check(&req(sp), &wrong_path).unwrap_err().status, 404);
        assert_eq!(check(&req("Sec-WebSocket-Protocol: chat\r\n"), &opts()).unwrap_err().status, 400);
        assert_eq!(check(&req(""), &opts()).unwrap_err().status, 400);
        let origins = WsOptions { allowed_origins: Some(vec!["http://good".into()]), ..opts() };
        assert_eq!(check(&req(&format!("{sp}Origin: http://evil\r\n")), &origins).unwrap_err().status, 403);
        assert!(check(&req(&format!("{sp}Origin: http://good\r\n")), &origins).is_ok());
        // No Origin header: not a browser; the allow-list does not apply.
        assert!(check(&req(sp), &origins).is_ok());
        let tok = WsOptions { bearer_token: Some("k".into()), ..opts() };
        assert_eq!(check(&req(sp), &tok).unwrap_err().status, 401);
        assert_eq!(
            check(&req(&format!("{sp}Authorization: Bearer nope\r\n")), &tok).unwrap_err().status,
            401
        );
    }

    #[test]
    fn token_may_come_in_the_query() {
        let tok = WsOptions { bearer_token: Some("a b".into()), ..opts() };
        let head = b"GET /hw?token=a%20b HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: hivewire.v1\r\n\r\n";
        assert_eq!(check(head, &tok).unwrap().token.as_deref(), Some("a b"));
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }

    #[tokio::test]
    async fn head_reading_is_bounded() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let big = vec![b'x'; MAX_HEAD + 10];
        b.write_all(&big).await.unwrap();
        let r = read_head(&mut a, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(r.status, 431);
        let (mut a, _b) = tokio::io::duplex(1024);
        let r = read_head(&mut a, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(r.status, 408);
    }

    #[tokio::test]
    async fn replay_gives_back_the_head_then_the_stream() {
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut r = Replay::new(b"hello".to_vec(), a);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
