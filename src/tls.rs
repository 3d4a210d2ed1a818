//! HTTPS on the API listener: a certificate chain and its key read from PEM files, held in a
//! cell a reload swaps (SIGHUP, `POST /v1/admin/reload`). Open connections keep the
//! certificate they shook hands with; new ones get the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// `[server.tls]` as validated: where the files are and what they held when read.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub certified: Arc<CertifiedKey>,
}

/// Reads a PEM certificate chain (leaf first) and its private key, and checks that they
/// belong together. Errors name the file and say what is wrong with it, never its content.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            (
                "cert",
                format!(
                    "{}: not a readable PEM certificate file: {e}",
                    cert.display()
                ),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "cert",
            format!("{}: holds no CERTIFICATE block", cert.display()),
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        (
            "key",
            format!(
                "{}: not a readable PEM private key file: {e}",
                key.display()
            ),
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| {
        (
            "key",
            format!("{}: unusable private key: {e}", key.display()),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        (
            "key",
            format!(
                "{} does not belong to the certificate in {}: {e}",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok(Arc::new(certified))
}

/// The certificate in force, swapped whole.
pub type Certs = crate::swap::Swap<CertifiedKey>;

/// Each handshake takes the certificate in force.
#[derive(Debug)]
struct Resolver(Arc<Certs>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// The TLS acceptor of the listener: TLS 1.2 and 1.3 with ring, HTTP/1.1, the certificate
/// from `certs` at each handshake.
pub fn acceptor(certs: Arc<Certs>) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(certs)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
