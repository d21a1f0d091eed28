//! The console page in headless Chromium, driven by Playwright
//! (`tests/browser/`), against real nodes of this build.

use std::path::Path;
use std::process::Command;

#[test]
fn console_page_works_in_a_real_browser() {
    // The page's test imports the client's test support: both in place.
    crate::testenv::js_package("clients/js");
    let dir = crate::testenv::js_package("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "headless Chromium is needed at {chromium} (apt-get install chromium, or set CHROMIUM)"
    );
    let output = Command::new("node")
        .args(["--test", "console.test.js"])
        .current_dir(&dir)
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .env("HERALD_TEST_ARTIFACTS", crate::testenv::artifacts())
        .output()
        .expect("Node.js 20+ runs the browser tests");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && report.contains("# fail 0"),
        "browser test failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
