//! Client certificate verification that reports its refusals.
//!
//! The decision is rustls's own `WebPkiClientVerifier`; this wrapper only observes it, so a
//! refused certificate (unknown CA, expired, revoked, ...) is logged with its reason and
//! counted, instead of vanishing inside the handshake.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

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
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
    observer: RefusalObserver,
}

impl ObservedVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, observer: RefusalObserver) -> Self {
        Self {
            inner: RwLock::new(inner),
            observer,
        }
    }

    pub fn replace(&self, inner: Arc<dyn ClientCertVerifier>) {
        // Replaced in one assignment: a poisoned lock still holds a whole verifier.
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
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
