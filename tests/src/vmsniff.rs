//! Running the real `vmsniff` binary inside a test's namespace.
use std::{path::PathBuf, process::Output};

use crate::netns::Netns;

/// The binary under test: `VMSNIFF_BIN`, else the debug build beside this test executable,
/// wherever cargo's target directory is (`CARGO_TARGET_DIR`, a config's `build.target-dir`).
pub fn binary() -> PathBuf {
    let path = std::env::var_os("VMSNIFF_BIN").map(PathBuf::from).unwrap_or_else(beside_this_executable);
    assert!(
        path.is_file(),
        "{} does not exist: build it with `cargo build -p vmsniff-user` (cargo xtask test does) or set VMSNIFF_BIN",
        path.display()
    );
    path
}

/// `<target>/debug/vmsniff` for a test executable at `<target>/debug/deps/NAME-HASH`.
fn beside_this_executable() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path (/proc/self/exe)");
    exe.parent().and_then(|deps| deps.parent()).map(|profile| profile.join("vmsniff")).unwrap_or(exe)
}

/// Runs vmsniff in `ns`'s network namespace, in the host's mount namespace, as
/// `nsenter --net=/run/netns/NS vmsniff ...` does.
pub fn run(ns: &Netns, args: &[&str]) -> Output {
    let bin = binary();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    ns.enter(move || {
        std::process::Command::new(bin).args(&args).env("RUST_LOG", "info").output().expect("start vmsniff")
    })
}

/// Runs vmsniff as `ip netns exec NS vmsniff ...`: in `ns`'s network namespace and in a mount
/// namespace of its own, whose /sys is a fresh sysfs without the host's bpffs.
pub fn netns_exec(ns: &Netns, args: &[&str]) -> Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("start ip netns exec vmsniff")
}

/// Runs vmsniff and returns stdout, panicking with its output when it fails.
pub fn ok(ns: &Netns, args: &[&str]) -> String {
    let out = run(ns, args);
    assert!(
        out.status.success(),
        "vmsniff {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs vmsniff expecting failure; returns stderr.
pub fn fails(ns: &Netns, args: &[&str]) -> String {
    let out = run(ns, args);
    assert!(
        !out.status.success(),
        "vmsniff {} should have failed but printed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `vmsniff attach ARGS`: the session id it prints.
pub fn attach(ns: &Netns, args: &[&str]) -> u32 {
    let mut all = vec!["attach"];
    all.extend_from_slice(args);
    let out = ok(ns, &all);
    out.trim().parse().unwrap_or_else(|_| panic!("attach printed {out:?}, not a session id"))
}

/// Starts `vmsniff mirror ARGS` in the background; returns the process and the session id it
/// printed. Its stderr is piped for the caller to read when it has exited.
pub fn spawn_mirror(ns: &Netns, args: &[&str]) -> (std::process::Child, u32) {
    let bin = binary();
    let args: Vec<String> = std::iter::once("mirror").chain(args.iter().copied()).map(String::from).collect();
    let mut child = ns.enter(move || {
        std::process::Command::new(bin)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start vmsniff mirror")
    });
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read the session id");
    let id = line.trim().parse().unwrap_or_else(|_| panic!("mirror printed {line:?}, not a session id"));
    (child, id)
}

/// `vmsniff status --json`.
pub fn status(ns: &Netns) -> serde_json::Value {
    let out = ok(ns, &["status", "--json"]);
    let value: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(value["version"], 1);
    value
}

/// One session's object from `status --json`.
pub fn session(ns: &Netns, id: u32) -> serde_json::Value {
    status(ns)["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .find(|s| s["session"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("session {id} missing from status"))
}

/// Which attach modes this kernel can test: netlink always, TCX from 6.6.
pub fn attach_modes() -> Vec<&'static str> {
    let release = nix::sys::utsname::uname().expect("uname").release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (6, 6) { vec!["netlink", "tcx"] } else { vec!["netlink"] }
}

/// Tells the VM harness which mode a test used.
pub fn report_mode(mode: &str) {
    println!("vmsniff-test: attach-mode={mode}");
}
