//! Who is calling: department and subject, read from the LEAF client certificate.
//!
//! Only the leaf names the caller: intermediates and roots name whoever issued it. The
//! mapping (which attribute or SAN gives the department, which the subject) comes from
//! `[identity]`. Anything missing, repeated or odd refuses the caller: an identity is
//! never guessed.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::X509Name;

use crate::config::{CertField, IdentityConfig};

/// Longest department or subject name accepted (they appear in logs, metrics and audit).
pub const MAX_IDENTITY_CHARS: usize = 128;

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub department: String,
    pub subject: String,
}

/// Why a verified certificate still yields no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the connection presented no client certificate")]
    NoCertificate,
    #[error("the client certificate could not be parsed: {0}")]
    Unparsable(String),
    #[error("the client certificate has no {0}")]
    Missing(&'static str),
    #[error("the client certificate has more than one {0}; the identity would be ambiguous")]
    Ambiguous(&'static str),
    #[error("the client certificate's {field} is not usable as a name: {reason}")]
    Unusable {
        field: &'static str,
        reason: &'static str,
    },
    /// The certificate names a department that no CA accepting its chain may vouch for
    /// (`[[tls.client_ca]] departments`).
    #[error(
        "the client certificate names the department {department:?}, which the CA that issued \
         it may not vouch for; ask that department's own CA for a certificate"
    )]
    DepartmentNotAllowedForCa { department: String },
    /// The certificate was accepted at the handshake but is refused now, by the CAs and CRLs
    /// in force (revoked since, or expired).
    #[error(
        "the client certificate is no longer accepted ({0}); open a new connection with a valid one"
    )]
    CertificateRefused(&'static str),
}

impl IdentityError {
    /// The stable code of the 401 answer (and the reason counted in metrics).
    pub fn code(&self) -> &'static str {
        match self {
            IdentityError::DepartmentNotAllowedForCa { .. } => "department_not_allowed_for_ca",
            IdentityError::CertificateRefused(_) => "certificate_refused",
            _ => "no_identity",
        }
    }
}

impl CertField {
    /// How the field is written in `moat.toml` and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            CertField::SubjectOrganization => "subject O",
            CertField::SubjectOrganizationalUnit => "subject OU",
            CertField::SubjectCommonName => "subject CN",
            CertField::SanDns => "DNS SAN",
            CertField::SanEmail => "e-mail SAN",
            CertField::SanUri => "URI SAN",
        }
    }
}

/// Reads the caller's identity from the DER of the leaf certificate.
pub fn identity_from_leaf(
    leaf_der: &[u8],
    mapping: &IdentityConfig,
) -> Result<Identity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let department = read_field(&cert, mapping.department)?;
    if department.contains(moat_core::policy::SUBJECT_SEPARATOR) {
        // Policies name a subject as "<department>/<subject>": a department holding the
        // separator could pass for another department's subject.
        return Err(IdentityError::Unusable {
            field: mapping.department.name(),
            reason: "contains '/', which separates department and subject in policies",
        });
    }
    Ok(Identity {
        department,
        subject: read_field(&cert, mapping.subject)?,
    })
}

fn read_field(cert: &X509Certificate<'_>, field: CertField) -> Result<String, IdentityError> {
    let values = match field {
        CertField::SubjectOrganization => subject_values(cert.subject(), field)?,
        CertField::SubjectOrganizationalUnit => subject_values(cert.subject(), field)?,
        CertField::SubjectCommonName => subject_values(cert.subject(), field)?,
        CertField::SanDns | CertField::SanEmail | CertField::SanUri => san_values(cert, field)?,
    };
    match values.as_slice() {
        [] => Err(IdentityError::Missing(field.name())),
        [one] => check_name(one, field),
        _ => Err(IdentityError::Ambiguous(field.name())),
    }
}

fn subject_values(name: &X509Name<'_>, field: CertField) -> Result<Vec<String>, IdentityError> {
    let attributes: Vec<_> = match field {
        CertField::SubjectOrganization => name.iter_organization().collect(),
        CertField::SubjectOrganizationalUnit => name.iter_organizational_unit().collect(),
        _ => name.iter_common_name().collect(),
    };
    attributes
        .into_iter()
        .map(|a| {
            a.as_str()
                .map(str::to_owned)
                .map_err(|_| IdentityError::Unusable {
                    field: field.name(),
                    reason: "not a text string",
                })
        })
        .collect()
}

fn san_values(cert: &X509Certificate<'_>, field: CertField) -> Result<Vec<String>, IdentityError> {
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match (field, name) {
            (CertField::SanDns, GeneralName::DNSName(v))
            | (CertField::SanEmail, GeneralName::RFC822Name(v))
            | (CertField::SanUri, GeneralName::URI(v)) => Some((*v).to_owned()),
            _ => None,
        })
        .collect())
}

/// Names go into logs, metrics labels and audit records: printable, bounded, trimmed.
fn check_name(value: &str, field: CertField) -> Result<String, IdentityError> {
    let unusable = |reason| IdentityError::Unusable {
        field: field.name(),
        reason,
    };
    if value.trim().is_empty() {
        return Err(unusable("empty"));
    }
    if value.trim() != value {
        return Err(unusable("leading or trailing whitespace"));
    }
    if value.chars().count() > MAX_IDENTITY_CHARS {
        return Err(unusable("longer than 128 characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(unusable("contains control characters"));
    }
    if value.chars().any(is_invisible_format) {
        // Would let "finance" and "fi\u{200B}nance", or a name reversed on screen, pass for
        // one another in logs, reports and policies.
        return Err(unusable(
            "contains invisible or direction-changing characters (zero-width or bidi controls)",
        ));
    }
    Ok(value.to_owned())
}

/// Zero-width characters, bidirectional controls and other invisible format characters.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn leaf(build: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        build(&mut params);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn default_mapping_reads_ou_and_cn() {
        let der = leaf(|p| {
            p.distinguished_name
                .push(DnType::OrganizationName, "Example Org");
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, "finance");
            p.distinguished_name.push(DnType::CommonName, "alice");
        });
        let id = identity_from_leaf(&der, &IdentityConfig::default()).expect("identity");
        assert_eq!(id.department, "finance");
        assert_eq!(id.subject, "alice");
    }

    #[test]
    fn sans_can_name_the_caller() {
        let der = leaf(|p| {
            p.distinguished_name.push(DnType::OrganizationName, "legal");
            p.subject_alt_names = vec![
                SanType::DnsName("batch.legal.example".try_into().expect("dns")),
                SanType::Rfc822Name("bob@example.org".try_into().expect("email")),
            ];
        });
        let mapping = IdentityConfig {
            department: CertField::SubjectOrganization,
            subject: CertField::SanEmail,
        };
        let id = identity_from_leaf(&der, &mapping).expect("identity");
        assert_eq!(
            (id.department.as_str(), id.subject.as_str()),
            ("legal", "bob@example.org")
        );
        let mapping = IdentityConfig {
            department: CertField::SubjectOrganization,
            subject: CertField::SanDns,
        };
        assert_eq!(
            identity_from_leaf(&der, &mapping).expect("id").subject,
            "batch.legal.example"
        );
    }

    #[test]
    fn missing_repeated_or_odd_names_refuse_the_caller() {
        let no_ou = leaf(|p| p.distinguished_name.push(DnType::CommonName, "alice"));
        assert_eq!(
            identity_from_leaf(&no_ou, &IdentityConfig::default()),
            Err(IdentityError::Missing("subject OU"))
        );
        let no_san = leaf(|p| p.distinguished_name.push(DnType::CommonName, "alice"));
        let mapping = IdentityConfig {
            department: CertField::SanUri,
            subject: CertField::SubjectCommonName,
        };
        assert_eq!(
            identity_from_leaf(&no_san, &mapping),
            Err(IdentityError::Missing("URI SAN"))
        );
        let control = leaf(|p| {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, "fin\nance");
            p.distinguished_name.push(DnType::CommonName, "alice");
        });
        assert!(matches!(
            identity_from_leaf(&control, &IdentityConfig::default()),
            Err(IdentityError::Unusable { .. })
        ));
        let two_sans = leaf(|p| {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, "finance");
            p.subject_alt_names = vec![
                SanType::DnsName("a.example".try_into().expect("dns")),
                SanType::DnsName("b.example".try_into().expect("dns")),
            ];
        });
        let mapping = IdentityConfig {
            department: CertField::SubjectOrganizationalUnit,
            subject: CertField::SanDns,
        };
        assert_eq!(
            identity_from_leaf(&two_sans, &mapping),
            Err(IdentityError::Ambiguous("DNS SAN"))
        );
        assert!(matches!(
            identity_from_leaf(b"not a certificate", &IdentityConfig::default()),
            Err(IdentityError::Unparsable(_))
        ));
    }

    #[test]
    fn invisible_and_bidi_characters_refuse_the_caller() {
        for department in [
            "fi\u{200B}nance",
            "finance\u{202E}",
            "\u{2066}legal\u{2069}",
            "\u{FEFF}hr",
        ] {
            let der = leaf(|p| {
                p.distinguished_name
                    .push(DnType::OrganizationalUnitName, department);
                p.distinguished_name.push(DnType::CommonName, "alice");
            });
            assert!(
                matches!(
                    identity_from_leaf(&der, &IdentityConfig::default()),
                    Err(IdentityError::Unusable {
                        field: "subject OU",
                        ..
                    })
                ),
                "{department:?} was accepted"
            );
        }
        let der = leaf(|p| {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, "Finanzabteilung München");
            p.distinguished_name.push(DnType::CommonName, "José");
        });
        identity_from_leaf(&der, &IdentityConfig::default()).expect("plain letters are names");
    }

    proptest::proptest! {
        /// A certificate damaged anywhere yields an identity or a refusal, never a panic.
        #[test]
        fn damaged_certificates_never_panic(at in 0usize..4096, byte in proptest::prelude::any::<u8>()) {
            let mut der = leaf(|p| {
                p.distinguished_name.push(DnType::OrganizationalUnitName, "finance");
                p.distinguished_name.push(DnType::CommonName, "alice");
            });
            let index = at % der.len();
            der[index] = byte;
            let _ = identity_from_leaf(&der, &IdentityConfig::default());
            let _ = identity_from_leaf(&der[..index], &IdentityConfig::default());
        }
    }
}
