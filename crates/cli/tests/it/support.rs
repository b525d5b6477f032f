//! Processes of the `waymark` binary, stopped with the test, and the binary run as a
//! client.

use std::path::PathBuf;
use std::process::{Child, Command, Output};

use waymark_testkit::ADMIN_TOKEN;

/// The repository's `examples/` directory.
pub fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// Runs the binary with `args`, pointed at `endpoint` through the variable `endpoint_var`
/// (e.g. `WAYMARK_ANALYTICS_ENDPOINT`), with the admin token.
pub fn run_client(endpoint_var: &str, endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(args)
        .env(endpoint_var, endpoint)
        .env("WAYMARK_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("RUST_LOG")
        .output()
        .expect("the waymark binary")
}

/// The standard output of a run that must have succeeded.
pub fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A child process, killed when dropped (also when the test fails half-way).
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free local port (bound, then released for the process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
