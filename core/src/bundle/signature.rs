//! Bundle signing keys and `manifest.sig`.
//!
//! The signature is ed25519 over a domain tag followed by the exact bytes of
//! `manifest.toml`; the manifest holds every file's SHA-256, so the signature covers the
//! whole bundle. The tag keeps a bundle signature from ever being valid as any other message
//! the same key might sign.
//!
//! Key files are one line of text: `moat-bundle-public-key-v1 BASE64 [comment]` (32 bytes)
//! and `moat-bundle-secret-key-v1 BASE64` (the 32-byte seed).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::audit::encoding::hex;

/// Prefixed to the manifest bytes before signing.
pub const SIGNATURE_DOMAIN: &[u8] = b"moat-bundle-manifest-v1\0";
const PUBLIC_TAG: &str = "moat-bundle-public-key-v1";
const SECRET_TAG: &str = "moat-bundle-secret-key-v1";

/// Why a key or signature could not be read, or a signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("not a bundle {kind} key: expected one line `{tag} BASE64`")]
    BadKeyFile {
        kind: &'static str,
        tag: &'static str,
    },
    #[error("manifest.sig is not valid: {0}")]
    BadSignatureFile(String),
    #[error(
        "the bundle is signed by key {key_id}, which is not among the {trusted} trusted key(s); \
         add its public key to the trusted keys directory if you trust it"
    )]
    UnknownKey { key_id: String, trusted: usize },
    #[error(
        "the signature of manifest.toml by key {key_id} ({name}) is not valid: the manifest was altered or signed by another key"
    )]
    Invalid { key_id: String, name: String },
}

/// The short id of a public key: the first 8 bytes of SHA-256 over it, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex(&digest[..8])
}

/// A public key the appliance trusts to sign bundles, named after its file.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub name: String,
    pub key: VerifyingKey,
}

impl TrustedKey {
    /// The key in a trusted keys directory's file `file_name`, whose text is `text`.
    pub fn from_file(file_name: &str, text: &str) -> Result<Self, SignatureError> {
        Ok(Self {
            name: file_name.to_owned(),
            key: parse_public_key(text)?,
        })
    }

    pub fn id(&self) -> String {
        key_id(&self.key)
    }
}

/// The text of a public key file.
pub fn public_key_text(key: &VerifyingKey, comment: &str) -> String {
    let comment = comment.replace(['\n', '\r'], " ");
    format!(
        "{PUBLIC_TAG} {} {comment}\n",
        STANDARD.encode(key.as_bytes())
    )
    .replace(" \n", "\n")
}

/// The text of a secret key file.
pub fn secret_key_text(key: &SigningKey) -> String {
    format!("{SECRET_TAG} {}\n", STANDARD.encode(key.to_bytes()))
}

fn key_bytes(
    text: &str,
    tag: &'static str,
    kind: &'static str,
) -> Result<[u8; 32], SignatureError> {
    let bad = || SignatureError::BadKeyFile { kind, tag };
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(bad)?;
    let mut words = line.split_whitespace();
    if words.next() != Some(tag) {
        return Err(bad());
    }
    let bytes = STANDARD
        .decode(words.next().ok_or_else(bad)?)
        .map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// Reads a public key file.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, SignatureError> {
    let bytes = key_bytes(text, PUBLIC_TAG, "public")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| SignatureError::BadKeyFile {
        kind: "public",
        tag: PUBLIC_TAG,
    })
}

/// Reads a secret key file.
pub fn parse_secret_key(text: &str) -> Result<SigningKey, SignatureError> {
    key_bytes(text, SECRET_TAG, "secret").map(|seed| SigningKey::from_bytes(&seed))
}

/// `manifest.sig`: which key signed, and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSignature {
    pub key_id: String,
    /// Standard base64 of the 64-byte signature.
    pub signature: String,
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + manifest.len());
    message.extend_from_slice(SIGNATURE_DOMAIN);
    message.extend_from_slice(manifest);
    message
}

impl BundleSignature {
    /// Signs the bytes of `manifest.toml`.
    pub fn sign(manifest: &[u8], key: &SigningKey) -> Self {
        let signature = key.sign(&signed_message(manifest));
        Self {
            key_id: key_id(&key.verifying_key()),
            signature: STANDARD.encode(signature.to_bytes()),
        }
    }

    pub fn to_toml(&self) -> String {
        // Two plain strings always serialize.
        toml::to_string(self).unwrap_or_default()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, SignatureError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| SignatureError::BadSignatureFile(e.to_string()))?;
        toml::from_str(text).map_err(|e| SignatureError::BadSignatureFile(e.message().to_owned()))
    }

    /// Checks the signature of `manifest` against the trusted keys; the key that signed.
    pub fn verify<'k>(
        &self,
        manifest: &[u8],
        trusted: &'k [TrustedKey],
    ) -> Result<&'k TrustedKey, SignatureError> {
        let bytes: [u8; 64] = STANDARD
            .decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                SignatureError::BadSignatureFile("signature is not 64 bytes of base64".into())
            })?;
        let signature = Signature::from_bytes(&bytes);
        let key = trusted
            .iter()
            .find(|k| k.id() == self.key_id)
            .ok_or_else(|| SignatureError::UnknownKey {
                key_id: self.key_id.clone(),
                trusted: trusted.len(),
            })?;
        key.key
            .verify_strict(&signed_message(manifest), &signature)
            .map_err(|_| SignatureError::Invalid {
                key_id: self.key_id.clone(),
                name: key.name.clone(),
            })?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(key: &SigningKey) -> Vec<TrustedKey> {
        vec![TrustedKey {
            name: "ml-team.pub".into(),
            key: key.verifying_key(),
        }]
    }

    #[test]
    fn key_files_round_trip() {
        let secret = key(7);
        let text = public_key_text(&secret.verifying_key(), "ml team\nsecond line");
        assert_eq!(text.lines().count(), 1);
        assert_eq!(parse_public_key(&text), Ok(secret.verifying_key()));
        let parsed = parse_secret_key(&secret_key_text(&secret)).map(|k| k.to_bytes());
        assert_eq!(parsed, Ok(secret.to_bytes()));
        // A secret key is not a public key, nor the reverse.
        assert!(parse_public_key(&secret_key_text(&secret)).is_err());
        assert!(parse_secret_key(&text).is_err());
        assert!(parse_public_key("moat-bundle-public-key-v1 AAAA").is_err());
    }

    #[test]
    fn a_signature_verifies_only_over_the_same_bytes_with_a_trusted_key() {
        let signer = key(1);
        let manifest = b"name = \"m\"\n";
        let signature = BundleSignature::sign(manifest, &signer);
        let parsed = BundleSignature::parse(signature.to_toml().as_bytes()).expect("parses");
        assert_eq!(parsed, signature);
        let keys = trusted(&signer);
        assert_eq!(
            signature.verify(manifest, &keys).map(|k| k.name.as_str()),
            Ok("ml-team.pub")
        );
        assert!(matches!(
            signature.verify(b"name = \"n\"\n", &keys),
            Err(SignatureError::Invalid { .. })
        ));
        assert!(matches!(
            signature.verify(manifest, &trusted(&key(2))),
            Err(SignatureError::UnknownKey { trusted: 1, .. })
        ));
        assert!(matches!(
            signature.verify(manifest, &[]),
            Err(SignatureError::UnknownKey { trusted: 0, .. })
        ));
    }

    #[test]
    fn a_signature_claiming_a_trusted_key_id_but_made_by_another_key_fails() {
        let manifest = b"x";
        let mut forged = BundleSignature::sign(manifest, &key(3));
        forged.key_id = key_id(&key(1).verifying_key());
        assert!(matches!(
            forged.verify(manifest, &trusted(&key(1))),
            Err(SignatureError::Invalid { .. })
        ));
    }

    #[test]
    fn the_domain_tag_is_part_of_what_is_signed() {
        let signer = key(4);
        let manifest = b"m";
        let bare = signer.sign(manifest);
        let signature = BundleSignature {
            key_id: key_id(&signer.verifying_key()),
            signature: STANDARD.encode(bare.to_bytes()),
        };
        assert!(signature.verify(manifest, &trusted(&signer)).is_err());
    }
}
