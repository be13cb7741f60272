//! Programs vmsniff did not create stay where they are and keep seeing every frame: a clsact
//! filter (any kernel) and a TCX program (Linux >= 6.6), with vmsniff attached in each mode and
//! after it detaches.
use std::time::Duration;

use vmsniff_tests::{
    foreign::{ForeignCounter, Hook},
    frames::{self, is_marked},
    privileged_on_host, run,
    topology::{Hypervisor, MIRROR_DEV, TAP, assert_frames_eq},
    vmsniff,
};

const QUIET: Duration = Duration::from_millis(500);

/// How the other tool's program is attached.
#[derive(Clone, Copy, Debug)]
enum Foreign {
    Clsact,
    Tcx,
}

fn foreign_kinds() -> Vec<Foreign> {
    if vmsniff::attach_modes().contains(&"tcx") {
        vec![Foreign::Clsact, Foreign::Tcx]
    } else {
        vec![Foreign::Clsact]
    }
}

fn attach_foreign(hv: &Hypervisor, kind: Foreign) -> (ForeignCounter, ForeignCounter) {
    let (mut ingress, mut egress) = (ForeignCounter::load(), ForeignCounter::load());
    match kind {
        Foreign::Clsact => {
            ingress.attach_clsact(&hv.ns, TAP, Hook::Ingress, 10);
            egress.attach_clsact(&hv.ns, TAP, Hook::Egress, 10);
        }
        Foreign::Tcx => {
            ingress.attach_tcx(&hv.ns, TAP, Hook::Ingress);
            egress.attach_tcx(&hv.ns, TAP, Hook::Egress);
        }
    }
    (ingress, egress)
}

/// What tc lists on the tap's hooks, for comparing before and after.
fn tc_state(hv: &Hypervisor) -> String {
    let ns = &hv.ns.name;
    let mut state = run("tc", &["-n", ns, "qdisc", "show", "dev", TAP]);
    for hook in ["ingress", "egress"] {
        state += &run("tc", &["-n", ns, "filter", "show", "dev", TAP, hook]);
    }
    state
}

#[test]
fn another_tools_tc_program_keeps_working_beside_vmsniff_and_after_it() {
    if !privileged_on_host(
        "another_tools_tc_program_keeps_working_beside_vmsniff_and_after_it",
        "which programs vmsniff leaves alone is its own logic over tc's netlink and TCX query APIs, \
         the same on every kernel; the clsact path itself mirrors in every guest",
    ) {
        return;
    }
    for kind in foreign_kinds() {
        for mode in vmsniff::attach_modes() {
            vmsniff::report_mode(mode);
            let what = format!("[foreign {kind:?}, vmsniff {mode}]");
            let mut hv = Hypervisor::new();
            let mirror = hv.mirror_port();
            let (ingress, egress) = attach_foreign(&hv, kind);
            let (out, into) = frames::both_ways(12);
            hv.vm_sends(&out);
            hv.vm_receives(&into);
            assert_eq!(
                (ingress.count(), egress.count()),
                (12, 12),
                "{what} the foreign program before vmsniff"
            );
            let before = tc_state(&hv);

            let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
            hv.vm_sends(&out);
            let copies = mirror.capture(out.len(), Duration::from_secs(10), is_marked);
            assert_frames_eq(&format!("{what} copies of frames the VM sent"), &out, &copies);
            hv.vm_receives(&into);
            let copies = mirror.capture(into.len(), Duration::from_secs(10), is_marked);
            assert_frames_eq(&format!("{what} copies of frames the VM received"), &into, &copies);
            assert_eq!(
                (ingress.count(), egress.count()),
                (24, 24),
                "{what} the foreign program while vmsniff is attached"
            );

            vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
            assert_eq!(tc_state(&hv), before, "{what} detach changed what tc shows on the tap");
            hv.vm_sends(&out);
            hv.vm_receives(&into);
            assert_eq!(
                (ingress.count(), egress.count()),
                (36, 36),
                "{what} the foreign program after detach"
            );
            assert!(mirror.drain(QUIET, is_marked).is_empty(), "{what} copies after detach");
        }
    }
}
