//! The manager's API client, used by agents, administrators and dispatchers.

use crate::identity::{ClusterDir, Token};
use crate::tls;
use crate::wire::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// API call failures, each naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The manager could not be reached.
    #[error(
        "cannot reach the manager at {url}: {detail} (is `shoal manager` running there? check the address: an agent's --join URL, the --manager flag of the other commands, or manager_url in the cluster directory's config.toml)"
    )]
    Unreachable {
        /// The URL tried.
        url: String,
        /// The transport error.
        detail: String,
    },
    /// The manager answered with an error.
    #[error("the manager refused {what} ({status}): {message}")]
    Status {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// The manager's explanation.
        message: String,
    },
    /// The manager's CA does not match the token's fingerprint.
    #[error(
        "the server at {url} is not this cluster's manager: its CA fingerprint {got} does not match the token's {want}; check the --join URL and the token"
    )]
    WrongManager {
        /// URL.
        url: String,
        /// Fingerprint presented.
        got: String,
        /// Fingerprint expected.
        want: String,
    },
    /// The TLS handshake failed on a certificate: the manager's is not
    /// signed by the CA this side trusts, or the manager refused ours.
    /// Retrying cannot fix either.
    #[error(
        "the manager at {url} and this side do not trust each other's certificates: {detail}; if the cluster was initialised again (`shoal init --force`), a node must join again (delete its agent directory, then `shoal agent --join URL --token TOKEN ...`), and an administrator needs the new cluster directory"
    )]
    Certificate {
        /// URL.
        url: String,
        /// The TLS error.
        detail: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the manager at {url}: {detail}")]
    Decode {
        /// URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// Local set-up failed (certificates, files).
    #[error("{0}")]
    Setup(String),
}

impl ApiError {
    /// The HTTP status, when the manager answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of the manager's API.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

fn build(cfg: rustls::ClientConfig) -> Result<reqwest::Client, ApiError> {
    build_from(cfg, None)
}

fn build_from(
    cfg: rustls::ClientConfig,
    source: Option<std::net::IpAddr>,
) -> Result<reqwest::Client, ApiError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .local_address(source)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ApiError::Setup(e.to_string()))
}

impl ApiClient {
    /// A client presenting `identity` (cert, key) and trusting `ca_pem`.
    pub fn new(base: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Self, ApiError> {
        let cfg =
            tls::client_config(ca_pem, identity).map_err(|e| ApiError::Setup(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: build(cfg)?,
        })
    }

    /// [`ApiClient::new`] whose connections come from `source` (a manager
    /// calls its federated peers from its own listen address).
    pub fn new_from(
        base: &str,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self, ApiError> {
        let cfg =
            tls::client_config(ca_pem, identity).map_err(|e| ApiError::Setup(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: build_from(cfg, source)?,
        })
    }

    /// The administrator's client for a cluster directory; `manager`
    /// overrides the URL recorded there.
    pub fn admin(dir: &ClusterDir, manager: Option<&str>) -> Result<Self, ApiError> {
        let setup = |e: crate::identity::IdentityError| ApiError::Setup(e.to_string());
        let cfg = dir.config().map_err(setup)?;
        let (cert, key) = dir.admin_identity().map_err(setup)?;
        let ca = dir.ca_pem().map_err(setup)?;
        Self::new(
            manager.unwrap_or(&cfg.manager_url),
            &ca,
            Some((&cert, &key)),
        )
    }

    /// The client a directory's identity makes: the administrator's in a
    /// cluster directory, a dispatcher's in a directory `shoal cert
    /// dispatcher` wrote.
    pub fn for_dir(dir: &ClusterDir, manager: Option<&str>) -> Result<Self, ApiError> {
        let setup = |e: crate::identity::IdentityError| ApiError::Setup(e.to_string());
        let cfg = dir.config().map_err(setup)?;
        let (cert, key) = dir.client_identity().map_err(setup)?;
        let ca = dir.ca_pem().map_err(setup)?;
        Self::new(
            manager.unwrap_or(&cfg.manager_url),
            &ca,
            Some((&cert, &key)),
        )
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn unreachable(&self, e: reqwest::Error) -> ApiError {
        let mut detail = e.to_string();
        let mut certificate = false;
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            certificate |= is_certificate_error(s);
            src = s.source();
        }
        if certificate {
            return ApiError::Certificate {
                url: self.base.clone(),
                detail,
            };
        }
        ApiError::Unreachable {
            url: self.base.clone(),
            detail,
        }
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<T, ApiError> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ApiError::Status {
                what: what.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            url: self.base.clone(),
            detail: e.to_string(),
        })
    }

    /// GET a JSON resource.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.decode(path, r).await
    }

    /// Sends JSON with `method` and decodes the JSON answer.
    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let r = self
            .http
            .request(method, self.url(path))
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.decode(path, r).await
    }

    /// POST JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.send(reqwest::Method::POST, path, body).await
    }

    /// Opens the server-sent event stream of registry changes.
    pub async fn watch(&self) -> Result<reqwest::Response, ApiError> {
        let r = self
            .http
            .get(self.url("/v1/watch"))
            .timeout(Duration::from_secs(365 * 24 * 3600))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !r.status().is_success() {
            return self
                .decode::<()>("/v1/watch", r)
                .await
                .map(|_| unreachable!());
        }
        Ok(r)
    }

    /// GET whose body the caller reads itself (a probe of the link), after
    /// the status is checked.
    pub async fn get_response(&self, path: &str) -> Result<reqwest::Response, ApiError> {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !r.status().is_success() {
            return self.decode::<()>(path, r).await.map(|_| unreachable!());
        }
        Ok(r)
    }

    /// Reads the next chunk of a response body (see
    /// [`ApiClient::get_response`]) and returns its length; `None` at the end.
    pub async fn chunk_len(&self, r: &mut reqwest::Response) -> Result<Option<usize>, ApiError> {
        Ok(r.chunk()
            .await
            .map_err(|e| self.unreachable(e))?
            .map(|c| c.len()))
    }

    /// The pool's status.
    pub async fn status(&self) -> Result<StatusResponse, ApiError> {
        self.get("/v1/status").await
    }
}

/// Whether a transport error is rustls refusing a certificate, ours or the
/// peer's. rustls errors reach us inside io::Errors, themselves sometimes
/// wrapped, and an io::Error's `source()` skips the error it wraps: look
/// inside each one, and fall back on rustls's own wording.
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return matches!(
            tls,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::AlertReceived(
                    A::BadCertificate
                        | A::UnknownCA
                        | A::CertificateUnknown
                        | A::CertificateRequired
                        | A::CertificateRevoked
                        | A::CertificateExpired
                        | A::UnsupportedCertificate
                        | A::AccessDenied
                )
        );
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && is_certificate_error(inner)
    {
        return true;
    }
    let text = e.to_string();
    text.starts_with("invalid peer certificate")
        || [
            "BadCertificate",
            "UnknownCA",
            "CertificateUnknown",
            "CertificateRequired",
        ]
        .iter()
        .any(|a| text.starts_with(&format!("received fatal alert: {a}")))
}

/// Joins a cluster: fetches and pins the CA, then trades the token for a
/// certificate. Returns (CA PEM, node key PEM, node cert PEM).
pub async fn join(
    url: &str,
    token: &Token,
    name: &str,
    roles: &[String],
) -> Result<(String, String, String), ApiError> {
    let base = url.trim_end_matches('/');
    let ca_pem = pinned_ca(base, token).await?;
    let (key_pem, csr_pem) =
        crate::identity::node_key_and_csr(name).map_err(|e| ApiError::Setup(e.to_string()))?;
    let pinned = ApiClient::new(base, &ca_pem, None)?;
    let resp: JoinResponse = pinned
        .post(
            "/v1/join",
            &JoinRequest {
                token: token.to_string(),
                name: name.to_string(),
                csr_pem,
                roles: roles.to_vec(),
            },
        )
        .await?;
    Ok((ca_pem, key_pem, resp.cert_pem))
}

/// Fetches the CA of the manager at `url` and checks it against the
/// fingerprint a token pins: the first step of a join and of a federation
/// link. Returns the CA's PEM.
pub async fn pinned_ca(url: &str, token: &Token) -> Result<String, ApiError> {
    let base = url.trim_end_matches('/');
    let boot = ApiClient {
        base: base.to_string(),
        http: build(tls::bootstrap_client_config().map_err(|e| ApiError::Setup(e.to_string()))?)?,
    };
    let r = boot
        .http
        .get(boot.url("/v1/ca"))
        .send()
        .await
        .map_err(|e| boot.unreachable(e))?;
    let ca_pem = r.text().await.map_err(|e| boot.unreachable(e))?;
    let got = crate::identity::pem_fingerprint(&ca_pem).map_err(|e| ApiError::Decode {
        url: base.to_string(),
        detail: format!("its CA is not a certificate: {e}"),
    })?;
    if got != token.ca_fingerprint {
        return Err(ApiError::WrongManager {
            url: base.to_string(),
            got: hex::encode(got),
            want: hex::encode(token.ca_fingerprint),
        });
    }
    Ok(ca_pem)
}
