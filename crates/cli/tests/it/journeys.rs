//! The journey verbs against a real `waymark serve orchestrator`: the example files are
//! validated, applied, published, listed and read back; a broken file is refused with
//! the field at fault; the example contact policy is put and read.

use std::process::{Command, Output, Stdio};

use waymark_testkit::{ADMIN_TOKEN, Backend, PATIENCE, TestDb, eventually};

use crate::support::{Process, examples, free_port, ok, run_client};

fn waymark(endpoint: &str, args: &[&str]) -> Output {
    run_client("WAYMARK_ORCHESTRATOR_ENDPOINT", endpoint, args)
}

async fn journey_files_go_through_the_cli(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = free_port();
    let _orchestrator = Process(
        Command::new(env!("CARGO_BIN_EXE_waymark"))
            .args(["serve", "orchestrator"])
            .env("WAYMARK_DATABASE_URL", &db.url)
            .env("WAYMARK_AUTO_MIGRATE", "true")
            .env("WAYMARK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("WAYMARK_LOG_FILTER", "warn")
            .env("WAYMARK_DRAIN_SECS", "0")
            .env(
                "WAYMARK_ORCHESTRATOR_GRPC_ADDR",
                format!("127.0.0.1:{port}"),
            )
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .spawn()
            .expect("the waymark binary"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    eventually("the orchestrator to serve", 2 * PATIENCE, async || {
        waymark(&endpoint, &["journeys", "list"]).status.success()
    })
    .await;

    let welcome = examples().join("journeys/welcome.yaml");
    let welcome = welcome.to_str().unwrap();
    assert_eq!(
        ok(waymark(&endpoint, &["journeys", "validate", "-f", welcome])).trim(),
        "[]"
    );
    ok(waymark(&endpoint, &["journeys", "apply", "-f", welcome]));
    ok(waymark(&endpoint, &["journeys", "publish", "welcome"]));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(waymark(&endpoint, &["journeys", "list"]))).unwrap();
    assert_eq!(listed[0]["journeyId"], "welcome");
    assert_eq!(listed[0]["status"], "JOURNEY_STATUS_LIVE");
    assert_eq!(listed[0]["liveVersion"], 1);
    let yaml = ok(waymark(
        &endpoint,
        &["journeys", "get", "welcome", "--yaml"],
    ));
    assert!(yaml.starts_with("journeyId: welcome"), "{yaml}");

    // A journey whose wait times out after "two days" (not a duration) and names a node
    // that does not exist: validate exits 1 listing both, apply is refused naming them.
    let broken = std::env::temp_dir().join(format!("broken-{}.yaml", unique_suffix()));
    std::fs::write(
        &broken,
        yaml.replace("timeout: 2d", "timeout: two days")
            .replace("timeoutNext: nudge", "timeoutNext: nowhere"),
    )
    .unwrap();
    let broken = broken.to_str().unwrap();
    let validated = waymark(&endpoint, &["journeys", "validate", "-f", broken]);
    assert_eq!(validated.status.code(), Some(1));
    let problems = String::from_utf8_lossy(&validated.stdout);
    assert!(problems.contains("timeout"), "{problems}");
    assert!(problems.contains("nowhere"), "{problems}");
    let refused = waymark(&endpoint, &["journeys", "apply", "-f", broken]);
    std::fs::remove_file(broken).ok();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("timeout"));

    let policy = examples().join("contact-policy.yaml");
    ok(waymark(
        &endpoint,
        &["contact-policy", "put", "-f", policy.to_str().unwrap()],
    ));
    let read: serde_json::Value =
        serde_json::from_str(&ok(waymark(&endpoint, &["contact-policy", "get"]))).unwrap();
    assert!(!read["caps"].as_array().unwrap().is_empty());
}
waymark_testkit::on_both_backends!(journey_files_go_through_the_cli);

/// A name no other run of this test uses at the same time.
fn unique_suffix() -> String {
    format!(
        "{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    )
}
