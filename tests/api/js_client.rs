//! The JavaScript client's own tests (Node's test runner), run against
//! real nodes of this build.

use tokio::process::Command;

use crate::helpers::PgDatabase;

#[tokio::test]
async fn javascript_client_tests_pass_against_real_nodes() {
    // The cluster test's store (the test starts its own redis-server).
    let pg = PgDatabase::create().await;
    let dir = crate::testenv::js_package("clients/js");
    let output = Command::new("node")
        .args(["--experimental-websocket", "--test", "test/client.test.js"])
        .current_dir(&dir)
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .env("HERALD_TEST_STORE_URL", pg.url())
        .output()
        .await
        .expect("Node.js 20+ runs the JavaScript client tests (apt-get install nodejs)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node --test failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("# fail 0"), "{report}");
}
