use super::*;
use std::os::unix::fs::PermissionsExt as _;

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn pid_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join("moatd.pid");
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

fn refused(path: &Path) -> ReloadError {
    reload(path, Path::new("/proc")).expect_err("refused")
}

#[test]
fn status_gives_the_name_and_user_ids() {
    let text = "Name:\tmoatd\nUmask:\t0077\nState:\tS (sleeping)\nUid:\t998\t998\t998\t998\n";
    assert_eq!(
        parse_status(text),
        Some(ProcessStatus {
            name: "moatd".into(),
            real_uid: 998,
            effective_uid: 998,
        })
    );
    assert_eq!(parse_status("Name:\tmoatd\n"), None);
    assert_eq!(parse_status("Uid:\t0\t0\t0\t0\n"), None);
}

#[test]
fn without_a_pid_file_nothing_is_signalled() {
    let dir = private_dir();
    let error = refused(&dir.path().join("moatd.pid"));
    assert!(matches!(error, ReloadError::NoPidFile(_)), "{error}");
    assert!(error.to_string().contains("--pid-file"), "{error}");
}

#[test]
fn a_pid_file_others_could_have_written_is_refused() {
    let dir = private_dir();
    let path = pid_file(dir.path(), &format!("{}\n", std::process::id()), 0o664);
    let error = refused(&path);
    assert!(
        matches!(&error, ReloadError::Unsafe { reason, .. } if reason.contains("mode 664")),
        "{error}"
    );

    let link = dir.path().join("link.pid");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let error = refused(&link);
    assert!(
        matches!(&error, ReloadError::Unsafe { reason, .. } if reason.contains("symbolic link")),
        "{error}"
    );

    let shared = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    let path = pid_file(shared.path(), &format!("{}\n", std::process::id()), 0o644);
    let error = refused(&path);
    assert!(
        matches!(&error, ReloadError::Unsafe { reason, .. } if reason.contains("its directory")),
        "{error}"
    );
}

#[test]
fn a_pid_file_without_a_pid_names_nobody() {
    let dir = private_dir();
    for text in ["", "moatd\n", "0\n", "1\n", "-1\n", "12 34\n"] {
        let error = refused(&pid_file(dir.path(), text, 0o644));
        assert!(matches!(error, ReloadError::NoPid(_)), "{text:?}: {error}");
    }
}

#[test]
fn a_pid_file_nobody_holds_is_left_over_and_its_pid_not_signalled() {
    // This very process: alive, but holding no lock on the file.
    let dir = private_dir();
    let pid = std::process::id() as i32;
    let error = refused(&pid_file(dir.path(), &format!("{pid}\n"), 0o644));
    assert!(
        matches!(&error, ReloadError::NotHeld { pid: named, .. } if *named == pid),
        "{error}"
    );
    assert!(error.to_string().contains("has stopped"), "{error}");
}
