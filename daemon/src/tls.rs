//! The department-facing TLS: rustls, TLS 1.3 only, client certificates required.
//!
//! A client is accepted only if its certificate chains to a configured department CA, is
//! within its validity period, and (when CRLs are configured) is not revoked according to a
//! CRL that has not expired itself. Each CA vouches only for the departments it is bound to
//! (`[[tls.client_ca]]`): a leaf naming another department is refused at every request
//! ([`ClientAuthority`]). There is no session resumption, and every request checks its
//! connection's chain again against the CAs and CRLs in force, so a revocation cuts a
//! kept-alive connection at its next request. SIGHUP reads the certificate, key, CAs and
//! CRLs again ([`TlsReloader`]), without a restart.

mod department_cas;
pub mod identity;
mod verifier;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerConfig, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

pub use identity::{Identity, IdentityError};
pub use verifier::RefusalObserver;

use crate::config::{IdentityConfig, TlsConfig};

/// Why the TLS configuration could not be built. Each variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: no PEM certificate found (tls.{field})")]
    NoCertificate { path: PathBuf, field: &'static str },
    #[error("{path}: not a usable PEM file (tls.{field}): {reason}")]
    BadPem {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("{path}: CA certificate refused (tls.client_ca file): {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{path}: not a CRL in PEM or DER form (tls.crl): {reason}")]
    BadCrl { path: PathBuf, reason: String },
    #[error("the client certificate verifier could not be built: {0}")]
    Verifier(String),
    #[error("the server certificate and key were refused: {0}")]
    ServerCertificate(String),
}

/// The crypto provider moatd uses: ring, TLS 1.3 suites only.
fn tls13_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|suite| suite.version() == &rustls::version::TLS13);
    Arc::new(provider)
}

/// Builds the listener's rustls configuration from `[tls]`; `on_refusal` hears the reason of
/// every client certificate refused. The returned [`TlsReloader`] puts new certificates, CAs
/// and CRLs from the same files in force without a restart.
pub fn server_config(
    tls: &TlsConfig,
    on_refusal: RefusalObserver,
) -> Result<(ServerConfig, TlsReloader), TlsError> {
    let provider = tls13_provider();
    let verifier = Arc::new(verifier::ObservedVerifier::new(
        client_verifier(tls, &provider)?,
        on_refusal,
    ));
    let certificate = Arc::new(ServerCertificate::new(certified_key(tls, &provider)?));
    let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(certificate.clone());
    // No resumption of any kind: no stateful session cache and no tickets.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    let reloader = TlsReloader {
        tls: tls.clone(),
        provider,
        certificate,
        verifier,
    };
    Ok((config, reloader))
}

/// Reads the `[tls]` files again and puts them in force for new connections (SIGHUP).
#[derive(Debug)]
pub struct TlsReloader {
    tls: TlsConfig,
    provider: Arc<CryptoProvider>,
    certificate: Arc<ServerCertificate>,
    verifier: Arc<verifier::ObservedVerifier>,
}

impl TlsReloader {
    /// The handle the API uses to name the caller of each request, with the CAs and CRLs
    /// in force at that request.
    pub fn client_authority(&self, mapping: IdentityConfig) -> ClientAuthority {
        ClientAuthority {
            verifier: Arc::clone(&self.verifier),
            mapping,
        }
    }

    /// Every file is read and checked before anything changes: on any error the material
    /// in force stays, whole.
    pub fn reload(&self) -> Result<(), TlsError> {
        let verifier = client_verifier(&self.tls, &self.provider)?;
        let key = certified_key(&self.tls, &self.provider)?;
        self.verifier.replace(verifier);
        self.certificate.replace(Arc::new(key));
        Ok(())
    }
}

/// Names the caller of each request from its connection's certificate chain.
#[derive(Debug, Clone)]
pub struct ClientAuthority {
    verifier: Arc<verifier::ObservedVerifier>,
    mapping: IdentityConfig,
}

impl ClientAuthority {
    /// The caller, if the chain (leaf first) is accepted now and its CA may vouch for the
    /// department it names.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<Identity, IdentityError> {
        self.verifier.identify(chain, &self.mapping)
    }

    /// [`ClientAuthority::identify`] for the requests of one connection: the verdict is
    /// kept in `memo` and reused while the same CAs and CRLs are in force, for at most
    /// [`VERDICT_LIFETIME`] (so a CRL or certificate that expires meanwhile still counts),
    /// which spares each request a signature check.
    pub fn identify_connection(
        &self,
        chain: &[CertificateDer<'_>],
        memo: &std::cell::RefCell<Option<Verdict>>,
    ) -> Result<Identity, IdentityError> {
        let generation = self.verifier.generation();
        let now = std::time::Instant::now();
        if let Some(verdict) = memo.borrow().as_ref()
            && verdict.generation == generation
            && now < verdict.until
        {
            if let Err(error) = &verdict.identity {
                self.verifier.recount(error);
            }
            return verdict.identity.clone();
        }
        let identity = self.identify(chain);
        *memo.borrow_mut() = Some(Verdict {
            generation,
            until: now + VERDICT_LIFETIME,
            identity: identity.clone(),
        });
        identity
    }
}

/// How long a connection's verdict is reused at most.
pub const VERDICT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection's last verdict on its caller.
#[derive(Debug, Clone)]
pub struct Verdict {
    generation: u64,
    until: std::time::Instant,
    identity: Result<Identity, IdentityError>,
}

/// The client certificate verifier: one per department CA, each with every CRL.
fn client_verifier(
    tls: &TlsConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<department_cas::DepartmentCas>, TlsError> {
    let crls = load_crls(&tls.crl)?;
    let mut cas = Vec::with_capacity(tls.client_ca.len());
    for ca in &tls.client_ca {
        let roots = load_roots(&ca.file)?;
        let verifier: Arc<dyn ClientCertVerifier> =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                .with_crls(crls.clone())
                // Without this rustls accepts a CRL past its next update: a stale list would
                // silently stop revoking.
                .enforce_revocation_expiration()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        cas.push((ca.file.clone(), verifier, ca.departments.clone()));
    }
    Ok(Arc::new(department_cas::DepartmentCas::new(cas)))
}

/// The server's chain and key, checked to belong together.
fn certified_key(tls: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = load_certificates(&tls.certificate, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&tls.private_key).map_err(|e| TlsError::BadPem {
        path: tls.private_key.clone(),
        field: "private_key",
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| TlsError::ServerCertificate(e.to_string()))
}

/// The server certificate in force, replaced whole on reload.
#[derive(Debug)]
struct ServerCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertificate {
    fn new(key: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
        }
    }

    fn replace(&self, key: Arc<CertifiedKey>) {
        // The value is replaced in one assignment: a poisoned lock still holds a whole one.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

fn load_certificates(
    path: &Path,
    field: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadPem {
        path: path.to_path_buf(),
        field,
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
            field,
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(path, "client_ca")? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn load_crls(files: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    for path in files {
        let bad = |reason: String| TlsError::BadCrl {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let from_pem = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let found = if from_pem.is_empty() {
            vec![CertificateRevocationListDer::from(bytes)]
        } else {
            from_pem
        };
        for crl in &found {
            warn_if_stale(path, crl).map_err(bad)?;
        }
        crls.extend(found);
    }
    Ok(crls)
}

/// Parses a CRL up front, so a corrupt file fails at start, and warns when it has expired:
/// every client its CA issued will be refused until it is replaced.
fn warn_if_stale(path: &Path, crl: &CertificateRevocationListDer<'_>) -> Result<(), String> {
    use x509_parser::prelude::FromDer as _;
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl)
        .map_err(|e| e.to_string())?;
    if let Some(next_update) = parsed.next_update()
        && next_update.timestamp() < unix_now()
    {
        tracing::warn!(
            crl = %path.display(),
            next_update = %next_update,
            "this CRL has expired: clients of its CA are refused until a current CRL is installed"
        );
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    struct Files {
        dir: tempfile::TempDir,
        config: TlsConfig,
    }

    fn ignore() -> RefusalObserver {
        Arc::new(|_| {})
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let server = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("server cert");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let config = TlsConfig {
            certificate: write("server.crt", &server.pem()),
            private_key: write("server.key", &key.serialize_pem()),
            client_ca: vec![crate::config::ClientCa {
                file: write("ca.crt", &ca_cert.pem()),
                departments: crate::config::DepartmentScope::Any,
            }],
            crl: Vec::new(),
        };
        Files { dir, config }
    }

    #[test]
    fn the_server_never_resumes_sessions() {
        let files = files();
        let (config, _) = server_config(&files.config, ignore()).expect("builds");
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.ticketer.enabled());
        assert_eq!(config.max_early_data_size, 0);
        assert!(config.session_storage.get(b"any id").is_none());
        assert!(
            !config
                .session_storage
                .put(b"id".to_vec(), b"state".to_vec())
        );
    }

    #[test]
    fn unusable_files_are_named() {
        let files = files();
        let garbage = files.dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");

        let mut no_ca = files.config.clone();
        no_ca.client_ca[0].file = garbage.clone();
        assert!(matches!(
            server_config(&no_ca, ignore()).map(|_| ()),
            Err(TlsError::NoCertificate {
                field: "client_ca",
                ..
            })
        ));

        let mut no_key = files.config.clone();
        no_key.private_key = garbage.clone();
        let error = server_config(&no_key, ignore())
            .map(|_| ())
            .expect_err("no key");
        assert!(error.to_string().contains("garbage.pem"), "{error}");

        let mut bad_crl = files.config.clone();
        bad_crl.crl = vec![garbage];
        assert!(matches!(
            server_config(&bad_crl, ignore()).map(|_| ()),
            Err(TlsError::BadCrl { .. })
        ));

        let mut mismatched = files.config.clone();
        mismatched.private_key = files.dir.path().join("other.key");
        let other = KeyPair::generate().expect("key").serialize_pem();
        std::fs::write(&mismatched.private_key, other).expect("write");
        assert!(matches!(
            server_config(&mismatched, ignore()).map(|_| ()),
            Err(TlsError::ServerCertificate(_))
        ));
    }
}
