//! `ip netns exec NS vmsniff ...` works as `nsenter --net=/run/netns/NS vmsniff ...` does: it
//! runs in a mount namespace of its own whose /sys has no bpffs, and vmsniff pins in the host's
//! bpffs all the same, so each way sees and removes the sessions the other made.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::expect_used, reason = "a failed step fails the test")]

use std::{process::Output, time::Duration};

use vmsniff_tests::{
    frames::{self, is_marked},
    netns::Netns,
    privileged_on_host,
    topology::{Hypervisor, MIRROR_DEV, TAP, assert_frames_eq},
    vmsniff,
};

fn succeeded(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn session_ids(status_json: &str) -> Vec<u64> {
    let status: serde_json::Value = serde_json::from_str(status_json).expect("status --json is JSON");
    status["sessions"].as_array().expect("sessions").iter().filter_map(|s| s["session"].as_u64()).collect()
}

/// The VM sends `n` frames; each must come out of the mirror device, in order.
fn mirrored(hv: &mut Hypervisor, mirror: &vmsniff_tests::packet::PacketSocket, what: &str) {
    let (out, _) = frames::both_ways(4);
    hv.vm_sends(&out);
    assert_frames_eq(what, &out, &mirror.capture(out.len(), Duration::from_secs(10), is_marked));
}

fn no_programs_left(ns: &Netns) {
    assert!(!ns.pin_dir().exists(), "pins left at {}", ns.pin_dir().display());
    for hook in ["ingress", "egress"] {
        let (_, filters, _) = ns.try_sh(&format!("tc filter show dev {TAP} {hook}"));
        assert!(!filters.contains("vmsniff"), "a vmsniff filter is left on {hook}: {filters}");
    }
}

#[test]
fn ip_netns_exec_and_nsenter_see_and_remove_each_others_sessions() {
    if !privileged_on_host(
        "ip_netns_exec_and_nsenter_see_and_remove_each_others_sessions",
        "where bpffs is found depends on mount namespaces, not on the kernel; both attach paths run on the host",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let attach = ["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode];

        // Made under `ip netns exec`: pinned in the host's bpffs, so the mirror outlives the
        // command's mount namespace (a TCX link pinned in a private bpffs would be gone).
        let id: u64 = succeeded("ip netns exec vmsniff attach", vmsniff::netns_exec(&hv.ns, &attach))
            .trim()
            .parse()
            .expect("attach prints the session id");
        assert!(
            hv.ns.pin_dir().is_dir(),
            "[{mode}] no pins in the host's bpffs at {}",
            hv.ns.pin_dir().display()
        );
        mirrored(&mut hv, &mirror, &format!("[{mode}] attached under ip netns exec"));
        let from_nsenter = vmsniff::ok(&hv.ns, &["status", "--json"]);
        assert_eq!(session_ids(&from_nsenter), [id], "[{mode}] nsenter's status: {from_nsenter}");
        vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
        no_programs_left(&hv.ns);

        // And the other way round.
        let id = vmsniff::attach(&hv.ns, &attach[1..]);
        let from_exec =
            succeeded("ip netns exec vmsniff status", vmsniff::netns_exec(&hv.ns, &["status", "--json"]));
        assert_eq!(session_ids(&from_exec), [u64::from(id)], "[{mode}] ip netns exec's status: {from_exec}");
        succeeded("ip netns exec vmsniff detach", vmsniff::netns_exec(&hv.ns, &["detach", &id.to_string()]));
        no_programs_left(&hv.ns);
        hv.vm_sends(&frames::both_ways(2).0);
        assert!(
            mirror.drain(Duration::from_millis(300), is_marked).is_empty(),
            "[{mode}] copies after detach"
        );
    }
}
