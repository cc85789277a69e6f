//! Certificates generated on the spot for tests (feature `test-pki`): a CA, a server and a
//! client certificate it signed, plus the bad cases — another CA nobody trusts, a server
//! certificate for the wrong name, and an expired one. Never use these outside tests.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
}

/// A small PKI for tests.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The trusted CA's certificate (PEM).
    pub ca_pem: String,
    /// A server certificate for `localhost` and `127.0.0.1`, signed by the CA.
    pub server: Pair,
    /// A client certificate (CN `hivewire-test-client`), signed by the CA.
    pub client: Pair,
    /// A server certificate for `wrong.example`, signed by the CA.
    pub wrong_name: Pair,
    /// A server certificate for `localhost` that expired in 2020, signed by the CA.
    pub expired: Pair,
    /// A server certificate for `localhost` signed by a CA nobody trusts.
    pub untrusted: Pair,
}

impl TestPki {
    /// A listener's TLS settings: the server certificate and key.
    pub fn server_tls(&self) -> crate::TlsConfig {
        crate::TlsConfig {
            cert_chain_pem: Some(self.server.cert_pem.clone().into_bytes()),
            key_pem: Some(self.server.key_pem.clone().into_bytes()),
            ..crate::TlsConfig::default()
        }
    }

    /// A dialer's TLS settings: the CA to verify the server with.
    pub fn client_tls(&self) -> crate::TlsConfig {
        crate::TlsConfig { ca_pem: Some(self.ca_pem.clone().into_bytes()), ..crate::TlsConfig::default() }
    }
}

fn leaf(names: &[&str], issuer: &Issuer<'_, KeyPair>, expired: bool) -> Result<Pair, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("hivewire-test"));
    if expired {
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(2020, 1, 1);
    }
    let cert = params.signed_by(&key, issuer)?;
    Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// Generates a fresh test PKI.
pub fn generate() -> Result<TestPki, rcgen::Error> {
    let (ca_pem, issuer) = ca("hivewire test CA")?;
    let (_, rogue) = ca("rogue CA")?;
    Ok(TestPki {
        ca_pem,
        server: leaf(&["localhost", "127.0.0.1"], &issuer, false)?,
        client: leaf(&["hivewire-test-client"], &issuer, false)?,
        wrong_name: leaf(&["wrong.example"], &issuer, false)?,
        expired: leaf(&["localhost", "127.0.0.1"], &issuer, true)?,
        untrusted: leaf(&["localhost", "127.0.0.1"], &rogue, false)?,
    })
}
