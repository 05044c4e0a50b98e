//! Bundles from the attacker's side: every way a tar or manifest can lie is refused.

use std::collections::BTreeMap;
use std::io;

use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};

use super::Admit;
use super::archive::{BundleWriter, unpack};
use super::*;
use crate::audit::encoding::hex;

const MODEL: &[u8] = b"not really onnx, but bytes to hash";
const TOKENIZER: &[u8] = b"{\"model\": {}}";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn trusted() -> Vec<TrustedKey> {
    vec![TrustedKey {
        name: "ml-team.pub".into(),
        key: key(1).verifying_key(),
    }]
}

fn file_line(path: &str, bytes: &[u8]) -> String {
    format!(
        "[[files]]\npath = \"{path}\"\nsize = {}\nsha256 = \"{}\"\n",
        bytes.len(),
        hex(&Sha256::digest(bytes))
    )
}

fn manifest_with(version: &str, extra: &str, files: &[(&str, &[u8])]) -> String {
    let mut text = format!(
        "format = 1\nname = \"demo\"\nversion = \"{version}\"\ntask = \"chat\"\n\
         classification_ceiling = \"internal\"\n{extra}\n\
         [sampling]\ntemperature = 0.0\n\n\
         [model]\nformat = 1\nname = \"demo\"\narchitecture = \"llama\"\nio_contract = \"fused\"\n\
         num_layers = 1\nnum_kv_heads = 2\nhead_dim = 16\nvocab_size = 359\ncontext_length = 256\n\
         eos_token_ids = [2]\nchat_template = \"{{{{ messages }}}}\"\n\
         inputs = [\"input_ids\", \"attention_mask\", \"past_key_values.0.key\", \"past_key_values.0.value\"]\n\
         outputs = [\"logits\", \"present.0.key\", \"present.0.value\"]\n\n\
         [[golden]]\nprompt = \"What is the capital of France?\"\npattern = \"Paris\"\n\n"
    );
    for (path, bytes) in files {
        text.push_str(&file_line(path, bytes));
    }
    text
}

fn manifest() -> String {
    manifest_with(
        "1.2.0",
        "",
        &[("model.onnx", MODEL), ("tokenizer.json", TOKENIZER)],
    )
}

fn tar(manifest: &str, signer: Option<&SigningKey>, files: &[(&str, &[u8])]) -> Vec<u8> {
    let signature = signer.map(|k| BundleSignature::sign(manifest.as_bytes(), k).to_toml());
    let mut writer = BundleWriter::new(
        Vec::new(),
        manifest.as_bytes(),
        signature.as_deref().map(str::as_bytes),
    )
    .expect("writes");
    for (name, bytes) in files {
        writer
            .add(name, bytes.len() as u64, *bytes)
            .expect("writes");
    }
    writer.finish().expect("finishes")
}

fn good_files() -> Vec<(&'static str, &'static [u8])> {
    vec![("model.onnx", MODEL), ("tokenizer.json", TOKENIZER)]
}

/// Unpacks into memory and verifies.
fn open(bytes: &[u8]) -> Result<(VerifiedBundle, BTreeMap<String, Vec<u8>>), BundleError> {
    let written = std::cell::RefCell::new(BTreeMap::new());
    let (verified, _) = unpack_verified(bytes, &trusted(), |name| {
        written.borrow_mut().insert(name.to_owned(), Vec::new());
        Ok(Sink(name.to_owned(), &written))
    })?;
    Ok((verified, written.into_inner()))
}

struct Sink<'a>(String, &'a std::cell::RefCell<BTreeMap<String, Vec<u8>>>);

impl io::Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(file) = self.1.borrow_mut().get_mut(&self.0) {
            file.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_signed_bundle_verifies_with_everything_the_manifest_says() {
    let (verified, files) = open(&tar(&manifest(), Some(&key(1)), &good_files())).expect("ok");
    let manifest = &verified.manifest;
    assert_eq!(manifest.label(), "demo@1.2.0");
    assert_eq!(manifest.task, BundleTask::Chat);
    assert_eq!(manifest.classification_ceiling.as_deref(), Some("internal"));
    assert_eq!(manifest.sampling.temperature, Some(0.0));
    assert_eq!(manifest.model.context_length, 256);
    assert_eq!(manifest.golden.len(), 1);
    assert_eq!(verified.signer, "ml-team.pub");
    assert_eq!(files.get("model.onnx").map(Vec::as_slice), Some(MODEL));
}

#[test]
fn a_tampered_file_is_refused() {
    let files = vec![
        ("model.onnx", &b"not really onnx, but bytes to hasH"[..]),
        ("tokenizer.json", TOKENIZER),
    ];
    let error = open(&tar(&manifest(), Some(&key(1)), &files)).expect_err("refused");
    assert!(matches!(&error, BundleError::HashMismatch { path, .. } if path == "model.onnx"));
    let truncated = vec![("model.onnx", &MODEL[1..]), ("tokenizer.json", TOKENIZER)];
    let error = open(&tar(&manifest(), Some(&key(1)), &truncated)).expect_err("refused");
    assert!(matches!(error, BundleError::SizeMismatch { .. }));
}

#[test]
fn a_tampered_manifest_fails_its_signature() {
    let signed = manifest();
    let signature = BundleSignature::sign(signed.as_bytes(), &key(1)).to_toml();
    let altered = signed.replace("internal", "secret");
    let mut writer =
        BundleWriter::new(Vec::new(), altered.as_bytes(), Some(signature.as_bytes())).expect("w");
    for (name, bytes) in good_files() {
        writer.add(name, bytes.len() as u64, bytes).expect("w");
    }
    let error = open(&writer.finish().expect("w")).expect_err("refused");
    assert!(matches!(
        error,
        BundleError::Signature(SignatureError::Invalid { .. })
    ));
}

#[test]
fn a_bundle_signed_by_an_untrusted_key_is_refused() {
    let error = open(&tar(&manifest(), Some(&key(9)), &good_files())).expect_err("refused");
    assert!(matches!(
        error,
        BundleError::Signature(SignatureError::UnknownKey { .. })
    ));
    assert_eq!(error.code(), "untrusted_key");
}

#[test]
fn an_unsigned_bundle_is_refused() {
    let error = open(&tar(&manifest(), None, &good_files())).expect_err("refused");
    assert!(matches!(error, BundleError::Unsigned));
}

#[test]
fn a_manifest_naming_a_missing_file_is_refused() {
    let text = manifest_with(
        "1.0.0",
        "",
        &[
            ("model.onnx", MODEL),
            ("tokenizer.json", TOKENIZER),
            ("model.onnx.data", b"weights"),
        ],
    );
    let error = open(&tar(&text, Some(&key(1)), &good_files())).expect_err("refused");
    assert!(matches!(&error, BundleError::MissingFile { path } if path == "model.onnx.data"));
}

#[test]
fn a_file_the_manifest_does_not_list_is_refused() {
    let mut files = good_files();
    files.push(("extra.bin", b"smuggled"));
    let error = open(&tar(&manifest(), Some(&key(1)), &files)).expect_err("refused");
    assert!(matches!(&error, BundleError::UnlistedFile { path } if path == "extra.bin"));
}

/// The manifest and a good signature as a tar, without the two zero blocks that end the
/// archive: entries written byte by byte go after it (and the archive is ended again).
fn signed_start() -> Vec<u8> {
    let text = manifest();
    let signature = BundleSignature::sign(text.as_bytes(), &key(1)).to_toml();
    let writer =
        BundleWriter::new(Vec::new(), text.as_bytes(), Some(signature.as_bytes())).expect("w");
    let mut out = writer.finish().expect("w");
    out.truncate(out.len() - 1024);
    out
}

/// A tar entry whose header says what an attacker wants, written byte by byte (the tar
/// crate's own setters refuse such names).
fn hostile_tar(name: &[u8], kind: tar::EntryType, link: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = signed_start();
    let mut header = tar::Header::new_old();
    {
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
    }
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(kind);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn path_traversal_entries_are_refused_before_anything_is_written() {
    for name in [
        &b"../evil"[..],
        b"/etc/passwd",
        b"sub/model.onnx",
        b".hidden",
        b"..",
    ] {
        let bytes = hostile_tar(name, tar::EntryType::Regular, b"", b"x");
        let mut created = Vec::new();
        let error = unpack(
            &bytes[..],
            |_, _| Ok(Admit::Any),
            |name| {
                created.push(name.to_owned());
                Ok(io::sink())
            },
        )
        .expect_err("refused");
        assert!(
            matches!(error, BundleError::Archive(ArchiveError::BadPath { .. })),
            "{}: {error}",
            String::from_utf8_lossy(name)
        );
        assert!(created.is_empty(), "nothing is written for {created:?}");
    }
}

#[test]
fn links_and_directories_are_refused() {
    for (kind, what) in [
        (tar::EntryType::Symlink, "symbolic link"),
        (tar::EntryType::Link, "hard link"),
        (tar::EntryType::Directory, "directory"),
        (tar::EntryType::Char, "device"),
    ] {
        let bytes = hostile_tar(b"model.onnx", kind, b"/etc/shadow", b"");
        let error =
            unpack(&bytes[..], |_, _| Ok(Admit::Any), |_| Ok(io::sink())).expect_err("refused");
        assert!(
            matches!(&error, BundleError::Archive(ArchiveError::NotAFile { kind, .. }) if *kind == what),
            "{error}"
        );
    }
}

#[test]
fn only_listed_files_at_their_listed_sizes_are_written_once_the_signature_checked_out() {
    let keys = trusted();
    let try_unpack = |bytes: &[u8]| {
        let mut created = Vec::new();
        let outcome = unpack_verified(bytes, &keys, |name| {
            created.push(name.to_owned());
            Ok(io::sink())
        });
        (outcome, created)
    };
    let mut files = vec![("smuggled.bin", &b"xx"[..])];
    files.extend(good_files());
    let (outcome, created) = try_unpack(&tar(&manifest(), Some(&key(1)), &files));
    assert!(matches!(outcome, Err(BundleError::UnlistedFile { .. })));
    assert!(created.is_empty(), "{created:?}");
    let grown = vec![(
        "model.onnx",
        &b"a much longer file than the manifest lists, by far"[..],
    )];
    let (outcome, created) = try_unpack(&tar(&manifest(), Some(&key(1)), &grown));
    assert!(matches!(outcome, Err(BundleError::SizeMismatch { .. })));
    assert!(created.is_empty(), "{created:?}");
    // Forged or unsigned: not one file is accepted.
    let (outcome, created) = try_unpack(&tar(&manifest(), Some(&key(9)), &good_files()));
    assert!(matches!(outcome, Err(BundleError::Signature(_))));
    assert!(created.is_empty());
    let (outcome, created) = try_unpack(&tar(&manifest(), None, &good_files()));
    assert!(matches!(outcome, Err(BundleError::Unsigned)));
    assert!(created.is_empty());
}

#[test]
fn the_manifest_and_signature_must_come_first() {
    let mut writer = tar::Builder::new(Vec::new());
    for (name, bytes) in good_files() {
        let mut header = tar::Header::new_ustar();
        header.set_path(name).expect("path");
        header.set_size(bytes.len() as u64);
        header.set_cksum();
        writer.append(&header, bytes).expect("writes");
    }
    let bytes = writer.into_inner().expect("finishes");
    let error = open(&bytes).expect_err("refused");
    assert!(matches!(
        error,
        BundleError::Archive(ArchiveError::ManifestNotFirst(_))
    ));
}

#[test]
fn a_repeated_entry_is_refused() {
    let mut files = good_files();
    files.push(("model.onnx", MODEL));
    let error = open(&tar(&manifest(), Some(&key(1)), &files)).expect_err("refused");
    assert!(matches!(
        error,
        BundleError::Archive(ArchiveError::Duplicate(_))
    ));
}

#[test]
fn garbage_is_not_a_bundle() {
    let error = open(b"this is not a tar archive at all, just text").expect_err("refused");
    assert!(matches!(error, BundleError::Archive(_)), "{error}");
    let error = open(&[]).expect_err("refused");
    assert!(matches!(
        error,
        BundleError::Archive(ArchiveError::NoManifest)
    ));
}

fn parse(text: &str) -> Result<BundleManifest, ManifestError> {
    BundleManifest::parse(text.as_bytes())
}

#[test]
fn manifest_fields_are_validated() {
    let files = good_files();
    assert!(matches!(
        parse(&manifest_with("1.0", "", &files)),
        Err(ManifestError::BadVersion { .. })
    ));
    let base = manifest();
    let cases = [
        (
            base.replace("name = \"demo\"\nversion", "name = \"a/b\"\nversion"),
            "BadName",
        ),
        (
            base.replace("name = \"demo\"\nversion", "name = \"..\"\nversion"),
            "BadName",
        ),
        (
            base.replace("task = \"chat\"", "task = \"embedding\""),
            "TaskMismatch",
        ),
        (
            base.replace("pattern = \"Paris\"", "pattern = \"(\""),
            "Golden",
        ),
        (
            base.replace(
                "pattern = \"Paris\"",
                "pattern = \"Paris\"\nexpect = \"Paris\"",
            ),
            "Golden",
        ),
        (
            base.replace("pattern = \"Paris\"\n", "")
                .replace("prompt = \"What is the capital of France?\"\n", "")
                .replace("[[golden]]\n", ""),
            "NoGoldenPrompts",
        ),
        (
            base.replace("temperature = 0.0", "temperature = 7.0"),
            "Sampling",
        ),
        (
            base.replace("\"present.0.value\"]", "\"present.0.valu\"]"),
            "IoNames",
        ),
        (
            base.replace("path = \"model.onnx\"", "path = \"../model.onnx\""),
            "BadPath",
        ),
        (
            base.replace("path = \"tokenizer.json\"", "path = \"model.onnx\""),
            "DuplicateFile",
        ),
        (
            base.replace("num_kv_heads = 2", "num_kv_heads = 0"),
            "Model",
        ),
        (
            format!("{base}surprise = 1\n").replacen("[model]", "surprise = 1\n[model]", 1),
            "Syntax",
        ),
    ];
    for (text, expected) in cases {
        let error = parse(&text).expect_err(expected);
        assert!(
            format!("{error:?}").starts_with(expected),
            "{expected}: {error:?}"
        );
    }
}

#[test]
fn versions_compare_as_semantic_versions() {
    let version = |v: &str| {
        parse(&manifest_with(v, "", &good_files()))
            .expect("parses")
            .version
    };
    assert!(version("1.10.0") > version("1.9.3"));
    assert!(version("2.0.0-rc.1") < version("2.0.0"));
}

#[test]
fn a_response_schema_becomes_json() {
    let text = manifest_with(
        "1.0.0",
        "[response_schema]\ntype = \"object\"\nrequired = [\"answer\"]\n",
        &good_files(),
    );
    let manifest = parse(&text).expect("parses");
    assert_eq!(
        manifest.response_schema,
        Some(serde_json::json!({"type": "object", "required": ["answer"]}))
    );
}

#[test]
fn a_pax_size_beyond_the_listed_one_is_refused_before_anything_is_written() {
    let mut out = signed_start();
    let pad = |out: &mut Vec<u8>| out.resize(out.len().div_ceil(512) * 512, 0);
    // A PAX record says the next entry is 1 MiB; its own header says the listed size.
    let big = 1usize << 20;
    let record = |len: usize| format!("{len} size={big}\n");
    let mut len = record(0).len();
    while record(len).len() != len {
        len = record(len).len();
    }
    let body = record(len).into_bytes();
    let mut pax = tar::Header::new_ustar();
    pax.set_path("PaxHeaders/model.onnx").expect("path");
    pax.set_size(body.len() as u64);
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_cksum();
    out.extend_from_slice(pax.as_bytes());
    out.extend_from_slice(&body);
    pad(&mut out);
    let mut file = tar::Header::new_ustar();
    file.set_path("model.onnx").expect("path");
    file.set_size(MODEL.len() as u64);
    file.set_mode(0o644);
    file.set_entry_type(tar::EntryType::Regular);
    file.set_cksum();
    out.extend_from_slice(file.as_bytes());
    out.extend_from_slice(&vec![7u8; big]);
    pad(&mut out);
    out.extend_from_slice(&[0u8; 1024]);
    let keys = trusted();
    let mut created = Vec::new();
    let outcome = unpack_verified(&out[..], &keys, |name| {
        created.push(name.to_owned());
        Ok(io::sink())
    });
    assert!(
        matches!(&outcome, Err(BundleError::SizeMismatch { found, .. }) if *found == big as u64),
        "{outcome:?}"
    );
    assert!(created.is_empty(), "{created:?}");
}
