//! What `scripts/test.sh` (the README's test command) prepares in the build
//! folder, as the tests find it: npm packages for the JavaScript tests, a
//! Python virtual environment for the examples, a place for artifacts.
//! Nothing here writes into the source tree.

use std::path::{Path, PathBuf};

/// `<build folder>/test-env`.
pub fn dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<build folder>/tmp` for integration tests.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the build folder")
        .join("test-env")
}

const SETUP: &str = "run the tests with scripts/test.sh (README: Tests), which installs it";

/// The JavaScript package at `package` (relative to the repository, e.g.
/// `clients/js`), copied without its `node_modules` beside the packages
/// `scripts/test.sh` installed for it, keeping its place in the tree (so
/// that its relative imports still resolve). Returns where it now is.
pub fn js_package(package: &str) -> PathBuf {
    let root = dir().join("js");
    let mirror = root.join(package);
    assert!(
        mirror.join("node_modules").is_dir(),
        "{package}'s npm packages are not in {}: {SETUP}",
        mirror.display()
    );
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(package),
        &mirror,
    );
    mirror
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "node_modules" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The Python of the examples' virtual environment.
pub fn python() -> PathBuf {
    let python = std::env::var_os("HERALD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir().join("venv/bin/python"));
    assert!(
        python.exists(),
        "no Python virtual environment at {}: {SETUP}",
        python.display()
    );
    python
}

/// Where tests leave what a person may look at (screenshots).
pub fn artifacts() -> PathBuf {
    let artifacts = dir().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    artifacts
}
