//! rustls configurations built from [`TlsConfig`], shared by every backend that speaks TLS
//! (`tls://`, `wss://`, `quic://`): server certificates from PEM, CA verification on by
//! default, an explicitly named opt-out, and optional mutual TLS whose verified client identity
//! reaches the authenticator as [`CLIENT_CERT_SHA256`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tracing::warn;

use crate::{TlsConfig, TransportError};

/// Attribute of `PeerInfo` holding the SHA-256 fingerprint (lower-case hex) of the verified
/// client certificate under mutual TLS.
pub const CLIENT_CERT_SHA256: &str = "tls.client_cert_sha256";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::ConnectionError(format!("TLS configuration: {what}: {e}"))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| tls_err(what, e))?;
    if certs.is_empty() {
        return Err(tls_err(what, "no certificate in the PEM"));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| tls_err(what, e))
}

fn roots(pem: &[u8]) -> Result<RootCertStore, TransportError> {
    let mut store = RootCertStore::empty();
    for c in certs(pem, "CA certificates")? {
        store.add(c).map_err(|e| tls_err("CA certificate", e))?;
    }
    Ok(store)
}

/// The rustls server configuration `tls` describes.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TransportError> {
    let chain = certs(
        tls.cert_chain_pem
            .as_deref()
            .ok_or_else(|| tls_err("listener", "no certificate chain (cert_chain_pem)"))?,
        "certificate chain",
    )?;
    let key = key(
        tls.key_pem.as_deref().ok_or_else(|| tls_err("listener", "no private key (key_pem)"))?,
        "private key",
    )?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?;
    let builder = if tls.require_client_cert {
        let ca =
            tls.ca_pem.as_deref().ok_or_else(|| tls_err("mutual TLS", "require_client_cert needs ca_pem"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
            .build()
            .map_err(|e| tls_err("client verifier", e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| tls_err("certificate and key", e))?;
    Ok(Arc::new(config))
}

/// The rustls client configuration `tls` describes.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, TransportError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?;
    let builder = if tls.dangerous_accept_any_server_certificate {
        warn!("TLS server certificate verification is OFF (dangerous_accept_any_server_certificate)");
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider())))
    } else {
        let ca = tls
            .ca_pem
            .as_deref()
            .ok_or_else(|| tls_err("dialer", "no CA certificates (ca_pem) to verify the server with"))?;
        builder.with_root_certificates(roots(ca)?)
    };
    let config = match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(certs(c, "client certificate")?, key(k, "client key")?)
            .map_err(|e| tls_err("client certificate and key", e))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(tls_err("mutual TLS", "client_cert_pem and client_key_pem go together")),
    };
    Ok(Arc::new(config))
}

/// The explicit opt-out of server verification.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 fingerprint (lower-case hex) of a DER certificate, as stored under
/// [`CLIENT_CERT_SHA256`].
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex_of(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// The server name a dialer verifies: `tls.server_name`, else the host of `host:port`
/// (brackets of an IPv6 literal removed).
pub fn server_name_for(tls: &TlsConfig, addr: &str) -> Result<ServerName<'static>, TransportError> {
    let host = tls.server_name.clone().unwrap_or_else(|| host_of(addr));
    ServerName::try_from(host)
        .map_err(|e| TransportError::InvalidUrl { url: addr.to_string(), reason: e.to_string() })
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("localhost:7000"), "localhost");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:443"), "::1");
    }
}
