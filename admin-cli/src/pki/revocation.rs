//! The revocation record (`revoked.json`): every certificate the CA has revoked and the number
//! of the last CRL it wrote, from which each new CRL is made.

use std::io;
use std::path::Path;

use clap::ValueEnum;
use rcgen::{RevocationReason, RevokedCertParams};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::authority::CertificateAuthority;
use super::serial::Serial;
use super::{Error, files};

/// File name of the revocation record inside the PKI directory.
pub const RECORD: &str = "revoked.json";
/// File name of the CRL inside the PKI directory.
pub const CRL: &str = "crl.pem";

/// Why a certificate was revoked (RFC 5280 reason codes, by their ASN.1 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// No reason given; the CRL entry then carries no reason code.
    Unspecified,
    /// The certificate's private key was exposed.
    KeyCompromise,
    /// A new certificate replaces this one.
    Superseded,
    /// The holder no longer needs the certificate.
    CessationOfOperation,
}

/// The contents of `revoked.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// Number of the last CRL written, 0 before the first; CRL numbers only ever increase.
    pub crl_number: u64,
    /// Revoked certificates, in the order they were revoked.
    pub revoked: Vec<RevokedCertificate>,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCertificate {
    pub serial: Serial,
    /// The certificate's subject, for the people who read this file.
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
    pub reason: Reason,
}

impl From<Reason> for RevocationReason {
    fn from(reason: Reason) -> Self {
        match reason {
            Reason::Unspecified => Self::Unspecified,
            Reason::KeyCompromise => Self::KeyCompromise,
            Reason::Superseded => Self::Superseded,
            Reason::CessationOfOperation => Self::CessationOfOperation,
        }
    }
}

impl RevocationRecord {
    /// Reads the record at `path`; a missing file is an empty record.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_str(&text).map_err(|source| Error::InvalidRecord {
            path: path.to_owned(),
            source,
        })
    }

    /// Replaces the record at `path`, pretty-printed.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut json =
            serde_json::to_string_pretty(self).map_err(|source| Error::InvalidRecord {
                path: path.to_owned(),
                source,
            })?;
        json.push('\n');
        files::write_atomic(path, json.as_bytes(), files::PUBLIC)
    }

    /// Adds `certificate` unless its serial is already listed, in which case the first
    /// revocation stands and this returns false.
    pub fn revoke(&mut self, certificate: RevokedCertificate) -> bool {
        if self.revoked.iter().any(|r| r.serial == certificate.serial) {
            return false;
        }
        self.revoked.push(certificate);
        true
    }

    /// Takes the next CRL number and signs a CRL listing every revoked serial, valid from `now`
    /// until `next_update`. Returns it as PEM; save the record so the number is not reused.
    pub fn next_crl(
        &mut self,
        ca: &CertificateAuthority,
        now: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, Error> {
        self.crl_number += 1;
        let entries = self
            .revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: (&r.serial).into(),
                revocation_time: r.revoked_at,
                reason_code: Some(r.reason.into()),
                invalidity_date: None,
            })
            .collect();
        ca.sign_crl(self.crl_number, entries, now, next_update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: &Serial, reason: Reason) -> RevokedCertificate {
        RevokedCertificate {
            serial: serial.clone(),
            subject: "CN=alice".to_owned(),
            revoked_at: OffsetDateTime::UNIX_EPOCH,
            reason,
        }
    }

    #[test]
    fn a_serial_is_recorded_once_with_its_first_reason() {
        let serial = Serial::random();
        let mut record = RevocationRecord::default();
        assert!(record.revoke(entry(&serial, Reason::KeyCompromise)));
        assert!(!record.revoke(entry(&serial, Reason::Superseded)));
        assert_eq!(record.revoked, vec![entry(&serial, Reason::KeyCompromise)]);
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(RECORD);
        assert_eq!(
            RevocationRecord::load(&path).expect("missing").crl_number,
            0
        );
        let mut record = RevocationRecord {
            crl_number: 7,
            ..RevocationRecord::default()
        };
        record.revoke(entry(&Serial::random(), Reason::CessationOfOperation));
        record.save(&path).expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"cessationOfOperation\""), "{text}");
        assert!(text.contains("\"1970-01-01T00:00:00Z\""), "{text}");
        let loaded = RevocationRecord::load(&path).expect("load");
        assert_eq!(loaded.crl_number, 7);
        assert_eq!(loaded.revoked, record.revoked);
    }
}
