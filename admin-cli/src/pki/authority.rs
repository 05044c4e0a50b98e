//! The certificate authority: creating its self-signed certificate, loading it back from its
//! directory, and signing client certificates, server certificates and CRLs with its key.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::pem::Pem;

use super::names::{CertName, Department};
use super::serial::Serial;
use super::{Error, files};

/// File name of the CA certificate inside the PKI directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA private key inside the PKI directory.
pub const CA_KEY: &str = "ca.key";

/// How far back certificates start, so that a client whose clock runs a little behind the
/// appliance's still accepts a certificate made a moment ago.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// When a certificate is valid; `not_before` is always earlier than `not_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// A new certificate and its new private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Who a client certificate names.
#[derive(Debug)]
pub struct ClientSubject<'a> {
    pub department: &'a Department,
    pub name: &'a CertName,
    /// Becomes an rfc822Name SAN when present.
    pub email: Option<&'a str>,
}

/// A CA loaded from its directory, ready to sign.
#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    organization: String,
    subject_der: Vec<u8>,
    key_identifier: Option<Vec<u8>>,
}

impl Validity {
    /// From [`CLOCK_SKEW`] before `now` to `days` after it.
    pub fn days_from(now: OffsetDateTime, days: u32) -> Self {
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// An explicit window, refused when it is empty.
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Self, Error> {
        if not_before >= not_after {
            return Err(Error::EmptyValidity {
                not_before,
                not_after,
            });
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[private key elided]")
            .finish()
    }
}

/// Makes a new self-signed CA named `organization`: subject O=organization,
/// CN="organization CA", allowed to sign end-entity certificates and CRLs only.
pub fn create(organization: &str, validity: Validity) -> Result<Issued, Error> {
    let mut params = base_params(validity);
    params
        .distinguished_name
        .push(DnType::OrganizationName, organization);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{organization} CA"));
    // Path length 0: this CA signs leaves, never intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = new_key()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl CertificateAuthority {
    /// Loads `dir`/ca.crt and `dir`/ca.key, refusing a key that others may read, a key that
    /// does not match the certificate, and an expired CA.
    pub fn load(dir: &Path, now: OffsetDateTime) -> Result<Self, Error> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if let Some(missing) = [&cert_path, &key_path].into_iter().find(|p| !p.exists()) {
            return Err(Error::NoAuthority {
                dir: dir.to_owned(),
                missing: missing.clone(),
            });
        }
        let key_pem = files::read_private(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| Error::InvalidKey {
            path: key_path.clone(),
            source,
        })?;
        let cert_pem = files::read_text(&cert_path)?;
        let pem = read_pem(&cert_path, &cert_pem)?;
        let cert = parse_certificate(&cert_path, &pem)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let not_after = cert.validity().not_after.to_datetime();
        if not_after <= now {
            return Err(Error::AuthorityExpired {
                path: cert_path,
                not_after,
            });
        }
        let organization = cert
            .subject()
            .iter_organization()
            .find_map(|attr| attr.as_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Error::MissingOrganization {
                path: cert_path.clone(),
            })?;
        Ok(Self {
            organization,
            subject_der: cert.subject().as_raw().to_vec(),
            key_identifier: subject_key_identifier(&cert),
            issuer: Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| {
                Error::InvalidCaCertificate {
                    path: cert_path,
                    source,
                }
            })?,
        })
    }

    /// Whether `cert` names this CA as its issuer, by name and, where `cert` carries one, by
    /// authority key identifier (a CA made again under the same name has a new key).
    pub fn is_issuer_of(&self, cert: &X509Certificate<'_>) -> bool {
        let same_key = match (authority_key_identifier(cert), &self.key_identifier) {
            (Some(theirs), Some(ours)) => theirs == *ours,
            _ => true,
        };
        same_key && cert.issuer().as_raw() == self.subject_der.as_slice()
    }

    /// Issues a client certificate: subject O=<CA's O>, OU=department, CN=name; extended key
    /// usage clientAuth only.
    pub fn issue_client(
        &self,
        subject: &ClientSubject<'_>,
        validity: Validity,
    ) -> Result<Issued, Error> {
        let mut subject_name = DistinguishedName::new();
        subject_name.push(DnType::OrganizationName, self.organization.as_str());
        subject_name.push(DnType::OrganizationalUnitName, subject.department.as_str());
        subject_name.push(DnType::CommonName, subject.name.as_str());
        let alt_names = match subject.email {
            Some(email) => vec![SanType::Rfc822Name(email.try_into()?)],
            None => Vec::new(),
        };
        self.sign_leaf(
            subject_name,
            alt_names,
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }

    /// Issues a server certificate for `dns` names and `ips`, at least one of them; the subject
    /// is O=<CA's O>, CN=the first DNS name, or the first address when there is none. Extended
    /// key usage serverAuth only.
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued, Error> {
        let common_name = dns
            .first()
            .cloned()
            .or_else(|| ips.first().map(IpAddr::to_string))
            .ok_or(Error::NoServerNames)?;
        let mut subject_name = DistinguishedName::new();
        subject_name.push(DnType::OrganizationName, self.organization.as_str());
        subject_name.push(DnType::CommonName, common_name);
        let mut alt_names = dns
            .iter()
            .map(|name| Ok(SanType::DnsName(name.as_str().try_into()?)))
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        alt_names.extend(ips.iter().copied().map(SanType::IpAddress));
        self.sign_leaf(
            subject_name,
            alt_names,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// Signs CRL number `number` listing `revoked`, valid from `this_update` until `next_update`;
    /// returns it as PEM.
    pub fn sign_crl(
        &self,
        number: u64,
        revoked: Vec<RevokedCertParams>,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, Error> {
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            // The CRL's authority key identifier must equal the CA certificate's subject key
            // identifier, which rcgen does not take from the issuer on its own.
            key_identifier_method: match &self.key_identifier {
                Some(id) => KeyIdMethod::PreSpecified(id.clone()),
                None => KeyIdMethod::Sha256,
            },
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// Signs an end-entity certificate for a new key.
    fn sign_leaf(
        &self,
        subject_name: DistinguishedName,
        alt_names: Vec<SanType>,
        purpose: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Issued, Error> {
        let mut params = base_params(validity);
        params.distinguished_name = subject_name;
        params.subject_alt_names = alt_names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Reads the first PEM block of `text`, read from `path`.
pub fn read_pem(path: &Path, text: &str) -> Result<Pem, Error> {
    x509_parser::pem::parse_x509_pem(text.as_bytes())
        .ok()
        .map(|(_, pem)| pem)
        .filter(|pem| pem.label == "CERTIFICATE")
        .ok_or_else(|| Error::NotPem {
            path: path.to_owned(),
        })
}

/// Parses the certificate in `pem`, read from `path`.
pub fn parse_certificate<'a>(path: &Path, pem: &'a Pem) -> Result<X509Certificate<'a>, Error> {
    pem.parse_x509().map_err(|e| Error::InvalidCertificate {
        path: path.to_owned(),
        source: match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => {
                x509_parser::error::X509Error::InvalidCertificate
            }
        },
    })
}

/// Parameters every certificate shares: a fresh random serial, the validity window and an
/// empty subject for the caller to fill.
fn base_params(validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some((&Serial::random()).into());
    params.distinguished_name = DistinguishedName::new();
    params
}

fn new_key() -> Result<KeyPair, Error> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn authority_key_identifier(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref(),
            _ => None,
        })
        .map(|id| id.0.to_vec())
}

fn subject_key_identifier(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_body(pem: &str) -> String {
        pem.lines()
            .filter(|line| !line.starts_with("-----"))
            .collect()
    }

    #[test]
    fn private_keys_never_reach_debug_output() {
        let now = OffsetDateTime::now_utc();
        let issued = create("moat dev", Validity::days_from(now, 1)).expect("CA");
        let dir = tempfile::tempdir().expect("tempdir");
        files::write_atomic(
            &dir.path().join(CA_KEY),
            issued.key_pem.as_bytes(),
            files::PRIVATE,
        )
        .expect("key");
        files::write_atomic(
            &dir.path().join(CA_CERT),
            issued.cert_pem.as_bytes(),
            files::PUBLIC,
        )
        .expect("cert");
        let ca = CertificateAuthority::load(dir.path(), now).expect("load");
        let secret = key_body(&issued.key_pem);
        assert!(!format!("{issued:?}").contains(&secret));
        assert!(!format!("{ca:?}").contains(&secret));
        let client = ca
            .issue_client(
                &ClientSubject {
                    department: &Department::parse("d", "Risk").expect("department"),
                    name: &CertName::parse("n", "alice").expect("name"),
                    email: None,
                },
                Validity::days_from(now, 1),
            )
            .expect("client");
        assert!(!format!("{client:?}").contains(&key_body(&client.key_pem)));
    }
}
