//! The set-up scripts a new user runs: how `onnx/export_sd.sh` finds the Python 3.12 its venv (the
//! fixtures' and the benchmark's reference) is made with, tried without side effects.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// Writes an executable shell script at `path`.
fn script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A Python 3.12 as far as the lookup can tell: it answers the version check.
fn working_python(path: &Path) {
    script(path, r#"[ "$1" = -c ] && echo True"#);
}

/// `export_sd.sh --find-python` with only `bin` and the system folders on PATH, `home` as HOME.
fn find_python(bin: &Path, home: &Path, env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/onnx/export_sd.sh"))
        .arg("--find-python")
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("HOME", home);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn a_pyenv_shim_that_cannot_run_is_passed_over_for_an_installed_3_12() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, home, pyenv) = (dir.path().join("bin"), dir.path().join("home"), dir.path().join("pyenv"));
    // pyenv's shim is on PATH, but 3.11 is the selected version: running python3.12 fails.
    script(&bin.join("python3.12"), "echo 'pyenv: python3.12: command not found' >&2; exit 127");
    for version in ["3.12.2", "3.12.10", "3.11.7"] {
        let name = if version.starts_with("3.12") { "python3.12" } else { "python3.11" };
        working_python(&pyenv.join("versions").join(version).join("bin").join(name));
    }
    let newest = pyenv.join("versions/3.12.10/bin/python3.12");

    let found = find_python(&bin, &home, &[("PYENV_ROOT", &pyenv)]);
    assert!(found.status.success(), "{}", String::from_utf8_lossy(&found.stderr));
    assert_eq!(stdout(&found), newest.display().to_string());

    // With no PYENV_ROOT, ~/.pyenv is where pyenv keeps its versions.
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(&pyenv, home.join(".pyenv")).unwrap();
    let found = find_python(&bin, &home, &[]);
    assert_eq!(stdout(&found), home.join(".pyenv/versions/3.12.10/bin/python3.12").display().to_string());

    // DESKGEN_PYTHON comes first when it runs, and is passed over when it does not.
    let chosen = dir.path().join("chosen/python");
    working_python(&chosen);
    let found = find_python(&bin, &home, &[("PYENV_ROOT", &pyenv), ("DESKGEN_PYTHON", &chosen)]);
    assert_eq!(stdout(&found), chosen.display().to_string());
    let broken = dir.path().join("missing/python");
    let found = find_python(&bin, &home, &[("PYENV_ROOT", &pyenv), ("DESKGEN_PYTHON", &broken)]);
    assert_eq!(stdout(&found), newest.display().to_string());

    // A python3.12 on PATH that runs is taken as it is.
    working_python(&bin.join("python3.12"));
    let found = find_python(&bin, &home, &[("PYENV_ROOT", &pyenv)]);
    assert_eq!(stdout(&found), bin.join("python3.12").display().to_string());
}

#[test]
fn without_a_working_3_12_the_lookup_says_what_it_tried_and_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    script(&bin.join("python3.12"), "exit 127");
    let found = find_python(&bin, dir.path(), &[("PYENV_ROOT", &dir.path().join("no-pyenv"))]);
    assert_eq!(found.status.code(), Some(1));
    assert!(found.stdout.is_empty());
    let said = String::from_utf8_lossy(&found.stderr);
    assert!(said.contains(&bin.join("python3.12").display().to_string()), "{said}");
    assert!(said.contains("DESKGEN_PYTHON") && said.contains("pyenv install 3.12"), "{said}");
    assert!(!dir.path().join(".cache").exists(), "looking made no venv");
}
