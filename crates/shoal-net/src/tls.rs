//! rustls configurations. One crypto provider (ring) everywhere, chosen
//! explicitly so no process depends on a global default.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::Arc;

/// TLS set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The crypto provider of every shoal process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses all certificates of a PEM text.
pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if v.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no certificate found".into(),
        });
    }
    Ok(v)
}

/// Parses a private key.
pub fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The manager's server configuration: client certificates signed by the
/// cluster CA are verified when presented; they are optional at the TLS
/// level because joining nodes have none yet. Each route checks the identity
/// it requires.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut chain = certs(cert_pem, "server certificate")?;
    chain.extend(certs(ca_pem, "CA certificate")?);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(key_pem, "server key")?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration trusting only the cluster CA, presenting
/// `identity` (cert PEM, key PEM) when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ClientConfig, TlsError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some((c, k)) => {
            b.with_client_auth_cert(certs(c, "client certificate")?, key(k, "client key")?)?
        }
        None => b.with_no_client_auth(),
    };
    // HTTP/1.1 keep-alive: an agent sends one small request every TTL/3,
    // and an idle HTTP/1.1 connection costs the manager far less memory
    // than an HTTP/2 one (no per-connection stream and flow-control state).
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A verifier that accepts any server certificate. Used for exactly one
/// request: fetching the CA before joining, whose answer is then checked
/// against the fingerprint in the token (kubeadm's cluster-info pattern).
#[derive(Debug)]
struct AcceptAnyOnce(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyOnce {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configuration for the unauthenticated CA fetch.
pub fn bootstrap_client_config() -> Result<ClientConfig, TlsError> {
    let p = provider();
    Ok(ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyOnce(p)))
        .with_no_client_auth())
}

/// The common name of the first certificate in a client's chain.
pub fn peer_common_name(certs: &[CertificateDer<'_>]) -> Option<String> {
    let first = certs.first()?;
    let (_, x) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    let cn = x.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// SHA-256 of the public key (subject public key bits) of a DER
/// certificate, hex: what binds a node name to the key that joined it.
pub fn cert_key_fingerprint(der: &[u8]) -> Option<String> {
    use sha2::{Digest, Sha256};
    let (_, x) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(Sha256::digest(
        x.tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .as_ref(),
    )))
}
