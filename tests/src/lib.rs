//! Helpers for vmsniff's privileged tests.
//!
//! Each test builds its own network namespaces (removed on drop, also when the test fails),
//! opens a tap whose file descriptor plays the VM (writing a frame = the VM sends it, reading =
//! the VM receives it), and runs the real `vmsniff` binary inside them. Traffic never leaves
//! the test's namespaces.
pub mod collect;
pub mod daemon;
pub mod foreign;
pub mod frames;
pub mod netns;
pub mod ovs;
pub mod ovsdb;
pub mod packet;
pub mod tap;
pub mod topology;
pub mod vmsniff;

/// True when the tests may change the kernel. Otherwise prints why they are skipped, loudly:
/// CI runs as root and must run them.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "\n!!! SKIPPED {test}: privileged tests need root (network namespaces, BPF, taps); run \
         them with `sudo -E cargo test -p vmsniff-tests` or through `cargo xtask test` !!!\n"
    );
    false
}

/// `privileged`, for a test whose subject does not depend on the kernel (argument checks,
/// messages, OVSDB rows): in the VM harness's guests (`VMSNIFF_TEST_KERNEL` set) it is skipped,
/// saying so, because it already ran on the host and an emulated CPU makes every test slow.
pub fn privileged_on_host(test: &str) -> bool {
    if let Ok(kernel) = std::env::var(GUEST_KERNEL_VAR) {
        skip(&format!("kernel-independent: it runs on the host, not again in the {kernel} guest"));
        return false;
    }
    privileged(test)
}

/// Set by the VM harness in its guests: the guest kernel's name (5.10, 6.1, 6.12).
pub const GUEST_KERNEL_VAR: &str = "VMSNIFF_TEST_KERNEL";

/// Reports a skip the VM harness can tabulate, then returns.
pub fn skip(reason: &str) {
    println!("vmsniff-test: skip: {reason}");
    eprintln!("!!! skipped: {reason}");
}

/// Runs a command and returns its stdout, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
