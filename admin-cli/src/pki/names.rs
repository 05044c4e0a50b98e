//! The names an operator types that end up in certificates and file names, checked before any
//! key is made.

use std::fmt;

/// Longest accepted certificate name or department (the X.520 bound on OU and CN).
const MAX_LEN: usize = 64;
/// Longest accepted organisation: the CA's CN is the organisation followed by " CA", and must
/// stay within the X.520 bound too.
const MAX_ORGANIZATION_LEN: usize = MAX_LEN - " CA".len();
/// Letters, digits, space and `._-`: the alphabet of departments and organisations.
const LABEL_ALPHABET: &str = "letters, digits, space, '.', '_' and '-'";

/// Why a name given on the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The value is empty.
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    /// The value is longer than the field allows.
    #[error("{field} is {len} characters long; at most {max} are allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// The value holds a character outside the field's alphabet.
    #[error("{field} {value:?} contains {found:?}; allowed are {allowed}")]
    BadCharacter {
        field: &'static str,
        value: String,
        found: char,
        allowed: &'static str,
    },
    /// A file name would start with '.', which covers "." and "..".
    #[error("{field} {value:?} must not start with '.'")]
    LeadingDot { field: &'static str, value: String },
    /// A department starts or ends with a space.
    #[error("{field} {value:?} must not start or end with a space")]
    OuterSpace { field: &'static str, value: String },
    /// The name belongs to the CA's own files.
    #[error("{field} {value:?} is reserved for the CA's own files")]
    Reserved { field: &'static str, value: String },
    /// Not of the form local@domain.
    #[error("--email {value:?} is not an address of the form local@domain")]
    Email { value: String },
    /// Not a DNS name made of labels of letters, digits and '-' (optionally "*." first).
    #[error("--dns {value:?} is not a DNS name (labels of letters, digits and '-', joined by '.')")]
    DnsName { value: String },
}

/// A certificate's name that is also its file stem: `[A-Za-z0-9._-]`, not starting with '.'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertName(String);

/// A department, the client certificate's OU: letters, digits, space and `._-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Department(String);

impl CertName {
    /// Checks the name given as `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, NameError> {
        check_alphabet(
            field,
            value,
            MAX_LEN,
            "letters, digits, '.', '_' and '-'",
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
        )?;
        if value.starts_with('.') {
            return Err(NameError::LeadingDot {
                field,
                value: value.to_owned(),
            });
        }
        Ok(Self(value.to_owned()))
    }

    /// Checks a server certificate's name, which must not collide with the CA's files.
    pub fn parse_server(field: &'static str, value: &str) -> Result<Self, NameError> {
        let name = Self::parse(field, value)?;
        if name.0.eq_ignore_ascii_case("ca") {
            return Err(NameError::Reserved {
                field,
                value: value.to_owned(),
            });
        }
        Ok(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Department {
    /// Checks the department given as `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, NameError> {
        check_label(field, value, MAX_LEN)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks the organisation of a new CA; same alphabet as a department.
pub fn check_organization(field: &'static str, value: &str) -> Result<(), NameError> {
    check_label(field, value, MAX_ORGANIZATION_LEN)
}

/// Checks an e-mail address closely enough to catch typos; the CA does not deliver mail.
pub fn check_email(value: &str) -> Result<(), NameError> {
    let refused = || NameError::Email {
        value: value.to_owned(),
    };
    if value.len() > MAX_LEN * 4 {
        return Err(refused());
    }
    let (local, domain) = value.split_once('@').ok_or_else(refused)?;
    let printable =
        |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_graphic() && c != '@');
    if !printable(local) || !printable(domain) || check_dns_name(domain).is_err() {
        return Err(refused());
    }
    Ok(())
}

/// Checks a DNS name for a server certificate's SAN; a leading "*." wildcard is allowed.
pub fn check_dns_name(value: &str) -> Result<(), NameError> {
    let refused = || NameError::DnsName {
        value: value.to_owned(),
    };
    let host = value.strip_prefix("*.").unwrap_or(value);
    if host.is_empty() || value.len() > 253 {
        return Err(refused());
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(refused())
    }
}

fn check_label(field: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    check_alphabet(field, value, max, LABEL_ALPHABET, |c| {
        c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-')
    })?;
    if value.starts_with(' ') || value.ends_with(' ') {
        return Err(NameError::OuterSpace {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

fn check_alphabet(
    field: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    in_alphabet: impl Fn(char) -> bool,
) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { field });
    }
    if let Some(found) = value.chars().find(|&c| !in_alphabet(c)) {
        return Err(NameError::BadCharacter {
            field,
            value: value.to_owned(),
            found,
            allowed,
        });
    }
    let len = value.chars().count();
    if len > max {
        return Err(NameError::TooLong { field, len, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_cannot_leave_their_directory() {
        for bad in ["", "..", ".", ".hidden", "../x", "a/b", "a\\b", "a b", "é"] {
            assert!(CertName::parse("--name", bad).is_err(), "{bad:?} accepted");
        }
        assert!(CertName::parse("--name", &"a".repeat(65)).is_err());
        for good in ["alice", "bob.smith", "svc_01-a", &"a".repeat(64)] {
            assert!(CertName::parse("--name", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn server_names_cannot_replace_the_ca() {
        assert!(matches!(
            CertName::parse_server("--name", "CA"),
            Err(NameError::Reserved { .. })
        ));
        assert!(CertName::parse_server("--name", "server").is_ok());
    }

    #[test]
    fn departments_allow_inner_spaces_only() {
        assert!(Department::parse("--department", "Risk Analytics").is_ok());
        for bad in ["", " Risk", "Risk ", "R&D", "a/b", "Zürich"] {
            assert!(
                Department::parse("--department", bad).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn organisations_leave_room_for_the_ca_suffix() {
        assert!(check_organization("--org", "moat dev").is_ok());
        assert!(check_organization("--org", &"o".repeat(61)).is_ok());
        assert!(matches!(
            check_organization("--org", &"o".repeat(62)),
            Err(NameError::TooLong { max: 61, .. })
        ));
    }

    #[test]
    fn emails_and_dns_names() {
        assert!(check_email("alice@example.org").is_ok());
        for bad in [
            "alice",
            "@example.org",
            "alice@",
            "a@b@c",
            "a b@example.org",
        ] {
            assert!(check_email(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["localhost", "moat.example.org", "*.example.org", "a-1.b"] {
            assert!(check_dns_name(good).is_ok(), "{good:?} refused");
        }
        for bad in ["", "*.", "-a.org", "a..org", "a_b.org", "*", "a.*.org"] {
            assert!(check_dns_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
