//! The department CAs, each with the departments it may vouch for.
//!
//! Every `[[tls.client_ca]]` entry gets a verifier of its own (its roots and every CRL), so
//! that a chain is known to end at a particular CA, not at "one of the roots". A handshake
//! succeeds if any CA accepts the chain; which departments the caller may then claim is
//! the union of the scopes of the CAs that accept it.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::config::DepartmentScope;

/// One CA file's verifier and scope.
#[derive(Debug)]
struct BoundCa {
    file: PathBuf,
    verifier: Arc<dyn ClientCertVerifier>,
    scope: DepartmentScope,
}

/// All configured department CAs, in the order of the configuration.
#[derive(Debug)]
pub struct DepartmentCas {
    cas: Vec<BoundCa>,
}

impl DepartmentCas {
    /// `cas` must not be empty: the configuration requires at least one CA.
    pub fn new(
        cas: impl IntoIterator<Item = (PathBuf, Arc<dyn ClientCertVerifier>, DepartmentScope)>,
    ) -> Self {
        Self {
            cas: cas
                .into_iter()
                .map(|(file, verifier, scope)| BoundCa {
                    file,
                    verifier,
                    scope,
                })
                .collect(),
        }
    }

    /// The scopes of the CAs that accept this chain now, or why none does. When several
    /// refuse, the most telling reason wins: "revoked" by the issuing CA says more than
    /// "unknown issuer" from all the others.
    pub fn vouching(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Vec<&DepartmentScope>, rustls::Error> {
        let mut scopes = Vec::new();
        let mut refusal = None;
        for ca in &self.cas {
            match ca.verifier.verify_client_cert(leaf, intermediates, now) {
                Ok(_) => scopes.push(&ca.scope),
                Err(error) => {
                    let unknown_issuer = matches!(
                        error,
                        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                    );
                    if refusal.is_none() || !unknown_issuer {
                        if !unknown_issuer {
                            tracing::debug!(ca = %ca.file.display(), %error, "refused by this CA");
                        }
                        refusal = Some(error);
                    }
                }
            }
        }
        match (scopes.is_empty(), refusal) {
            (false, _) => Ok(scopes),
            (true, Some(error)) => Err(error),
            (true, None) => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    /// The verifier that checks handshake signatures for all of them.
    fn first(&self) -> Result<&Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.cas
            .first()
            .map(|ca| &ca.verifier)
            .ok_or_else(|| rustls::Error::General("no client CA is configured".into()))
    }
}

impl ClientCertVerifier for DepartmentCas {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.vouching(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
    }

    // The handshake signatures depend only on the crypto provider, which every CA's
    // verifier shares.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.first()
            .map(|verifier| verifier.supported_verify_schemes())
            .unwrap_or_default()
    }
}
