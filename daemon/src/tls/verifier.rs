//! Client certificate verification that reports its refusals.
//!
//! The chain decision is rustls's own `WebPkiClientVerifier`, one per department CA
//! ([`DepartmentCas`]); this wrapper observes it, so a refused certificate (unknown CA,
//! expired, revoked, ...) is logged with its reason and counted, instead of vanishing inside
//! the handshake. It also names the caller of each request ([`ObservedVerifier::identify`]):
//! the chain is checked again against the CAs and CRLs in force, and the department the
//! leaf claims must be one its CA may vouch for.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::department_cas::DepartmentCas;
use super::identity::{Identity, IdentityError, identity_from_leaf};
use crate::config::IdentityConfig;

/// Why a client certificate was refused, as a short stable name (a metrics label).
pub fn refusal_reason(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownRevocationStatus => "unknown_revocation_status",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "expired_crl",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            CertificateError::BadEncoding => "bad_encoding",
            _ => "invalid_certificate",
        },
        _ => "other",
    }
}

/// Called with the reason of every refused client certificate.
pub type RefusalObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Wraps a verifier, reporting each refusal it makes. The wrapped verifier can be replaced
/// while serving (new CAs or CRLs); each handshake uses the one in force when it asks.
pub struct ObservedVerifier {
    inner: RwLock<Arc<DepartmentCas>>,
    observer: RefusalObserver,
    /// Bumped at each reload: a verdict of an earlier generation is checked again.
    generation: AtomicU64,
}

impl ObservedVerifier {
    pub fn new(inner: Arc<DepartmentCas>, observer: RefusalObserver) -> Self {
        Self {
            inner: RwLock::new(inner),
            observer,
            generation: AtomicU64::new(0),
        }
    }

    pub fn replace(&self, inner: Arc<DepartmentCas>) {
        // Replaced in one assignment: a poisoned lock still holds a whole verifier.
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Which CAs and CRLs are in force: changes at each reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn current(&self) -> Arc<DepartmentCas> {
        Arc::clone(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller named by a connection's chain (leaf first), checked now against the CAs
    /// and CRLs in force: a certificate revoked since the handshake is refused at its
    /// connection's next request, and a department is accepted only from a CA that may
    /// vouch for it. Refusals are logged and counted by their code.
    pub fn identify(
        &self,
        chain: &[CertificateDer<'_>],
        mapping: &IdentityConfig,
    ) -> Result<Identity, IdentityError> {
        let result = self.check(chain, mapping);
        if let Err(
            error @ (IdentityError::DepartmentNotAllowedForCa { .. }
            | IdentityError::CertificateRefused(_)),
        ) = &result
        {
            tracing::warn!(
                reason = error.code(),
                subject = ?chain.first().map(leaf_subject),
                %error,
                "client refused"
            );
            (self.observer)(error.code());
        }
        result
    }

    /// Counts a refusal again for a later request on the same connection (logged once, when
    /// the verdict was reached).
    pub fn recount(&self, error: &IdentityError) {
        if matches!(
            error,
            IdentityError::DepartmentNotAllowedForCa { .. } | IdentityError::CertificateRefused(_)
        ) {
            (self.observer)(error.code());
        }
    }

    fn check(
        &self,
        chain: &[CertificateDer<'_>],
        mapping: &IdentityConfig,
    ) -> Result<Identity, IdentityError> {
        let (leaf, intermediates) = chain.split_first().ok_or(IdentityError::NoCertificate)?;
        let cas = self.current();
        let scopes = cas
            .vouching(leaf, intermediates, UnixTime::now())
            .map_err(|e| IdentityError::CertificateRefused(refusal_reason(&e)))?;
        let identity = identity_from_leaf(leaf, mapping)?;
        if scopes
            .iter()
            .any(|scope| scope.allows(&identity.department))
        {
            Ok(identity)
        } else {
            Err(IdentityError::DepartmentNotAllowedForCa {
                department: identity.department,
            })
        }
    }
}

impl fmt::Debug for ObservedVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedVerifier")
            .field("inner", &self.current())
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ObservedVerifier {
    fn offer_client_auth(&self) -> bool {
        self.current().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().client_auth_mandatory()
    }

    /// No hints: the list would have to outlive a reload of the CAs it names, and a client
    /// with a certificate sends it whether or not its CA was hinted.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self
            .current()
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(error) = &result {
            let reason = refusal_reason(error);
            // The subject is the client's own claim: logged escaped, for the record only.
            tracing::warn!(
                reason,
                subject = ?leaf_subject(end_entity),
                error = %error,
                "client certificate refused"
            );
            (self.observer)(reason);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.current().requires_raw_public_keys()
    }
}

fn leaf_subject(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer as _;
    match x509_parser::certificate::X509Certificate::from_der(der) {
        Ok((_, cert)) => cert.subject().to_string(),
        Err(_) => "(unparsable)".to_owned(),
    }
}
