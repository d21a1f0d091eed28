//! The console page in headless Chromium, driven by Playwright
//! (`tests/browser/`), against real nodes of this build.

use std::path::Path;
use std::process::Command;

#[test]
fn console_page_works_in_a_real_browser() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "run `npm ci --prefix tests/browser` first (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "headless Chromium is needed at {chromium} (apt-get install chromium, or set CHROMIUM)"
    );
    let output = Command::new("node")
        .args(["--test", "console.test.js"])
        .current_dir(&dir)
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .output()
        .expect("Node.js 20+ runs the browser tests");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && report.contains("# fail 0"),
        "browser test failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
