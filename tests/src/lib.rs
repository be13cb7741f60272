//! Helpers for vmsniff's privileged tests.
//!
//! Each test builds its own network namespaces (removed on drop, also when the test fails),
//! opens a tap whose file descriptor plays the VM (writing a frame = the VM sends it, reading =
//! the VM receives it), and runs the real `vmsniff` binary inside them. Traffic never leaves
//! the test's namespaces.
// Test support: a helper that cannot do its step panics saying what failed, which fails the test
// (or the xtask demo or benchmark, which build their scenes with these helpers) that called it.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the caller")]

pub mod collect;
pub mod daemon;
pub mod etcd;
pub mod foreign;
pub mod frames;
pub mod metrics;
pub mod monitored;
pub mod netns;
pub mod nspawn;
pub mod ovs;
pub mod ovsdb;
pub mod packet;
pub mod prometheus;
pub mod tap;
pub mod topology;
pub mod vmsniff;

/// True when the tests may change the kernel. Otherwise prints why they are skipped, loudly:
/// CI runs as root and must run them.
fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "\n!!! SKIPPED {test}: privileged tests need root (network namespaces, BPF, taps); run \
         them with `sudo -E cargo test -p vmsniff-tests` or through `cargo xtask test` !!!\n"
    );
    false
}

// Where a privileged test runs. `cargo xtask test` runs the suite on this host's kernel and in
// one boot of each guest kernel (Debian 5.10, 6.1, 6.12 under an emulated CPU, where every
// test costs tens of seconds). Every privileged test starts with exactly one of the three
// functions below, and its argument says why: the guests are for what this host's kernel
// cannot show, and a test runs there only where the kernel could change its outcome.

/// A test whose subject does not depend on the kernel (arguments and messages, controls'
/// exact counts, update semantics, session bookkeeping, libvirt and OVSDB, coexistence with
/// other tc users): it runs on the host, where it must cover both attach modes (loop over
/// [`vmsniff::attach_modes`]). The guests skip it and print `why_not_in_guests`.
pub fn privileged_on_host(test: &str, why_not_in_guests: &str) -> bool {
    if let Ok(kernel) = std::env::var(GUEST_KERNEL_VAR) {
        skip(&format!("host only, not in the {kernel} guest: {why_not_in_guests}"));
        return false;
    }
    privileged(test)
}

/// A test whose outcome the kernel could change (the verifier, a helper's behaviour, the
/// clsact or TCX attach path, GRE and ERSPAN devices, the OVS datapath): it runs on the host
/// and in every guest kernel. `why_in_guests` names what the kernel could change.
pub fn privileged_on_every_kernel(test: &str, why_in_guests: &str) -> bool {
    if let Ok(kernel) = std::env::var(GUEST_KERNEL_VAR) {
        eprintln!("{test} runs in the {kernel} guest: {why_in_guests}");
    }
    privileged(test)
}

/// The guest kernel that runs [`privileged_on_host_and_one_guest`]'s tests: bookworm's, the
/// kernel the demo boots too.
pub const ONE_GUEST: &str = "6.1";

/// A test that needs what only the guests have (ip_gre, openvswitch), but whose subject does
/// not vary by kernel, or whose kernel-dependent part another test checks on every kernel: it
/// runs on the host (where it may skip for want of the module) and in the [`ONE_GUEST`] guest.
/// The other guests skip it and print `why_one_guest`.
pub fn privileged_on_host_and_one_guest(test: &str, why_one_guest: &str) -> bool {
    if let Ok(kernel) = std::env::var(GUEST_KERNEL_VAR)
        && kernel != ONE_GUEST
    {
        skip(&format!("runs in the {ONE_GUEST} guest only, not in {kernel}: {why_one_guest}"));
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
