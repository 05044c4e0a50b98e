//! The store from the attacker's side: a signed bundle whose graph reads data from outside
//! it is refused at import and again at load (the store may have been edited, or the
//! version imported by a build that did not check graphs), and a link in a version
//! directory is refused even where its target has the listed hash.

use std::path::Path;

use ed25519_dalek::SigningKey;
use moat_core::audit::encoding::hex;
use moat_core::bundle::archive::BundleWriter;
use moat_core::bundle::{BundleError, BundleSignature, ExternalDataProblem, GraphError};

use super::*;

const TOKENIZER: &[u8] = b"{\"model\": {}}";

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn trusted() -> Vec<TrustedKey> {
    vec![TrustedKey {
        name: "ml-team.pub".into(),
        key: signing_key().verifying_key(),
    }]
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn field(number: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(number << 3 | 2, &mut out);
    varint(data.len() as u64, &mut out);
    out.extend_from_slice(data);
    out
}

/// The fixture graph with one more initializer, which reads its data from `location`
/// (a second graph field merges into the first, as ONNX Runtime's parser reads it).
fn graph_reading(location: &str) -> Vec<u8> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../local/models/fixture-fused");
    let mut graph = fs::read(fixture.join("model.onnx")).expect("run `bash scripts/setup.sh`");
    let mut tensor = field(8, b"stolen");
    for (key, value) in [("location", location), ("offset", "0"), ("length", "32")] {
        let mut entry = field(1, key.as_bytes());
        entry.extend(field(2, value.as_bytes()));
        tensor.extend(field(13, &entry));
    }
    tensor.extend([14 << 3, 1]);
    graph.extend(field(7, &field(5, &tensor)));
    graph
}

fn manifest(files: &[(&str, &[u8])]) -> String {
    let mut text = "format = 1\nname = \"demo\"\nversion = \"1.0.0\"\ntask = \"completion\"\n\n\
         [model]\nformat = 1\nname = \"demo\"\narchitecture = \"llama\"\nio_contract = \"fused\"\n\
         num_layers = 1\nnum_kv_heads = 2\nhead_dim = 16\nvocab_size = 359\ncontext_length = 256\n\
         eos_token_ids = [2]\n\n[[golden]]\nprompt = \"Once\"\npattern = \".\"\n\n"
        .to_owned();
    for (path, bytes) in files {
        text.push_str(&format!(
            "[[files]]\npath = \"{path}\"\nsize = {}\nsha256 = \"{}\"\n",
            bytes.len(),
            hex(&hash_reader(*bytes).expect("hashes").sha256)
        ));
    }
    text
}

/// A bundle tar of `files`, signed by the trusted key.
fn signed_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let manifest = manifest(files);
    let signature = BundleSignature::sign(manifest.as_bytes(), &signing_key()).to_toml();
    let mut writer = BundleWriter::new(Vec::new(), manifest.as_bytes(), Some(signature.as_bytes()))
        .expect("writes");
    for (name, bytes) in files {
        writer
            .add(name, bytes.len() as u64, *bytes)
            .expect("writes");
    }
    writer.finish().expect("finishes")
}

/// The version directory a signed bundle of `files` would be installed as, written
/// directly into the store.
fn plant(store: &BundleStore, files: &[(&str, &[u8])]) {
    let dir = store.version_dir("demo", &semver::Version::new(1, 0, 0));
    fs::create_dir_all(&dir).expect("creates");
    let manifest = manifest(files);
    let signature = BundleSignature::sign(manifest.as_bytes(), &signing_key()).to_toml();
    fs::write(dir.join(MANIFEST_FILE), &manifest).expect("writes");
    fs::write(dir.join(SIGNATURE_FILE), signature).expect("writes");
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).expect("writes");
    }
}

fn external_refusal(
    result: Result<impl std::fmt::Debug, StoreError>,
) -> (String, ExternalDataProblem) {
    match result {
        Err(StoreError::Bundle(BundleError::Graph { source, .. })) => match *source {
            GraphError::ExternalData {
                location, problem, ..
            } => (location, problem),
            other => panic!("not refused for its external data: {other}"),
        },
        other => panic!("not refused for its graph: {other:?}"),
    }
}

const HOSTILE: [(&str, ExternalDataProblem); 3] = [
    (
        "../../audit-signing.key",
        ExternalDataProblem::ParentDirectory,
    ),
    ("/etc/moat/audit-signing.key", ExternalDataProblem::Absolute),
    ("weights.data", ExternalDataProblem::NotListed),
];

#[test]
fn an_import_whose_graph_reads_outside_the_bundle_is_refused_and_nothing_is_kept() {
    let root = tempfile::tempdir().expect("tempdir");
    let store = BundleStore::open(root.path()).expect("opens");
    for (location, problem) in HOSTILE {
        let graph = graph_reading(location);
        let tar = signed_tar(&[("model.onnx", &graph), ("tokenizer.json", TOKENIZER)]);
        let received = store.receive(tar.as_slice(), &trusted());
        if let Err(e) = &received {
            assert!(e.to_string().contains(&format!("{location:?}")), "{e}");
        }
        assert_eq!(external_refusal(received), (location.to_owned(), problem));
    }
    let staged = fs::read_dir(root.path().join("staging")).expect("staging");
    assert_eq!(staged.count(), 0, "a refused import leaves nothing behind");
}

#[test]
fn a_version_whose_graph_reads_outside_it_is_refused_when_it_loads() {
    for (location, problem) in HOSTILE {
        let root = tempfile::tempdir().expect("tempdir");
        let store = BundleStore::open(root.path()).expect("opens");
        let graph = graph_reading(location);
        plant(
            &store,
            &[("model.onnx", &graph), ("tokenizer.json", TOKENIZER)],
        );
        let opened = store.open_version("demo", &semver::Version::new(1, 0, 0), &trusted());
        assert_eq!(external_refusal(opened), (location.to_owned(), problem));
    }
}

#[test]
fn a_link_in_a_version_directory_is_refused_even_with_the_listed_hash() {
    let root = tempfile::tempdir().expect("tempdir");
    let store = BundleStore::open(root.path()).expect("opens");
    let graph = graph_reading("weights.data");
    let weights = [0u8; 32];
    let files: [(&str, &[u8]); 3] = [
        ("model.onnx", &graph),
        ("tokenizer.json", TOKENIZER),
        ("weights.data", &weights),
    ];
    let staged = store
        .receive(signed_tar(&files).as_slice(), &trusted())
        .expect("a graph reading a listed file is accepted");
    store.install(staged).expect("installs");
    let version = semver::Version::new(1, 0, 0);
    store
        .open_version("demo", &version, &trusted())
        .expect("verifies");

    // The same bytes, elsewhere, behind a link: the hash matches, the link is refused.
    let outside = root.path().join("weights.data");
    fs::write(&outside, weights).expect("writes");
    let linked = store.version_dir("demo", &version).join("weights.data");
    fs::remove_file(&linked).expect("removes");
    std::os::unix::fs::symlink(&outside, &linked).expect("links");
    match store.open_version("demo", &version, &trusted()) {
        Err(StoreError::NotAFile { path, kind }) => {
            assert_eq!((path, kind), (linked, "symbolic link"));
        }
        other => panic!("the link was not refused: {other:?}"),
    }
}
