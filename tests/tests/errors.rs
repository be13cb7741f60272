//! Bad input and broken environments: a clear error naming the fix, a non-zero exit, and the
//! system exactly as it was.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::expect_used, reason = "a failed step fails the test")]
use std::{path::PathBuf, time::Duration};

use aya::maps::{Array, HashMap, Map, MapData};
use vmsniff_ebpf::{
    ABI_VERSION, ABI_VERSIONS_UPGRADABLE, Direction, TAP_DIRECTIONS_KNOWN, TAP_INDEX_SHARED, TapIndexEntry,
    TapSessions, map_name, tap_index_slot,
};
use vmsniff_tests::{
    frames::{self, is_marked},
    netns::Netns,
    privileged_on_host, run, skip,
    topology::assert_frames_eq,
    topology::{Hypervisor, MIRROR_DEV, TAP},
    vmsniff,
};

fn assert_untouched(ns: &Netns, links_before: &[String]) {
    assert!(!ns.pin_dir().exists(), "a failed command left pins at {}", ns.pin_dir().display());
    assert_eq!(ns.link_names(), links_before, "a failed command changed the interfaces");
    for hook in ["ingress", "egress"] {
        let (_, filters, _) = ns.try_sh(&format!("tc filter show dev {TAP} {hook}"));
        assert!(!filters.contains("vmsniff"), "a failed command left a filter: {filters}");
    }
}

#[test]
fn unknown_tap_and_bad_names_are_refused_without_a_trace() {
    if !privileged_on_host(
        "unknown_tap_and_bad_names_are_refused_without_a_trace",
        "argument checks and messages, made before any kernel object is touched",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    hv.mirror_port();
    let before = hv.ns.link_names();
    let err = vmsniff::fails(&hv.ns, &["attach", "--tap", "tapnothere", "--to-dev", MIRROR_DEV]);
    assert!(err.contains("does not exist") && err.contains("ip link"), "{err}");
    let err = vmsniff::fails(&hv.ns, &["attach", "--tap", "tap/../x", "--to-dev", MIRROR_DEV]);
    assert!(err.contains("not a valid interface name"), "{err}");
    let err = vmsniff::fails(&hv.ns, &["attach", "--tap", TAP, "--to-dev", "nodev0"]);
    assert!(err.contains("nodev0") && err.contains("does not exist"), "{err}");
    let err = vmsniff::fails(&hv.ns, &["attach", "--tap", TAP, "--to-dev", TAP]);
    assert!(err.contains("mirrored tap itself"), "{err}");
    let err = vmsniff::fails(&hv.ns, &["attach", "no-such-vm", "--to-dev", MIRROR_DEV]);
    assert!(err.contains("--tap"), "{err}");
    assert_untouched(&hv.ns, &before);
}

#[test]
fn invalid_collectors_and_options_are_usage_errors() {
    if !privileged_on_host("invalid_collectors_and_options_are_usage_errors", "argument checks and messages")
    {
        return;
    }
    let ns = Netns::new("args");
    for (args, needle) in [
        (vec!["attach", "--tap", "x", "--to", "300.1.1.1"], "not an IP address"),
        (vec!["attach", "--tap", "x", "--to", "224.0.0.5"], "cannot be a collector"),
        (vec!["attach", "--tap", "x", "--to", "fe80::1"], "link-local"),
        (vec!["attach", "--tap", "x", "--to", "ff02::1"], "cannot be a collector"),
        (vec!["attach", "--tap", "x"], "--to"),
        (vec!["attach", "--tap", "x", "--to", "192.0.2.1", "--direction", "sideways"], "sideways"),
        (vec!["attach", "--tap", "x", "--to", "192.0.2.1", "--key", "4294967295"], "key"),
        (vec!["attach", "--tap", "x", "--to", "192.0.2.1", "--ttl", "0"], "ttl"),
        (vec!["detach"], "detach"),
    ] {
        let out = vmsniff::run(&ns, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!ns.pin_dir().exists());
}

#[test]
fn without_privileges_vmsniff_says_what_it_needs() {
    if !privileged_on_host(
        "without_privileges_vmsniff_says_what_it_needs",
        "the capability check comes before any kernel object is touched",
    ) {
        return;
    }
    let bin = vmsniff::binary();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(&bin)
        .args(["status"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CAP_NET_ADMIN") && err.contains("root"), "{err}");
}

#[test]
fn a_kernel_without_gre_gets_a_clear_error_and_nothing_is_left() {
    if !privileged_on_host(
        "a_kernel_without_gre_gets_a_clear_error_and_nothing_is_left",
        "every guest kernel loads ip_gre at boot, so the missing-GRE error cannot be provoked there",
    ) {
        return;
    }
    let probe = Netns::new("greprobe");
    if probe.try_sh("ip link add g0 type gretap remote 192.0.2.1").0 {
        skip("this kernel has GRE; the missing-GRE error cannot be provoked here");
        return;
    }
    let hv = Hypervisor::new();
    // A route to the collector, so that the attach gets as far as the GRE device.
    hv.ns.sh("ip link add up9 type veth peer name down9
         ip link set up9 up
         ip addr add 192.0.2.1/24 dev up9");
    let before = hv.ns.link_names();
    let err = vmsniff::fails(&hv.ns, &["attach", "--tap", TAP, "--to", "192.0.2.10"]);
    assert!(err.contains("ip_gre") && err.contains("--to-dev"), "{err}");
    assert_untouched(&hv.ns, &before);
}

#[test]
fn a_held_lock_is_waited_for_a_bounded_time_and_its_holder_named() {
    if !privileged_on_host(
        "a_held_lock_is_waited_for_a_bounded_time_and_its_holder_named",
        "the host-wide lock file and its error, before any kernel object is touched",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    hv.mirror_port();
    let before = hv.ns.link_names();
    // Someone else holds vmsniff's lock (util-linux flock: flock(2), as vmsniff takes it).
    let mut holder = std::process::Command::new("flock")
        .args(["--no-fork", "/run/lock/vmsniff.lock", "sleep", "30"])
        .spawn()
        .expect("util-linux flock");
    let locks_held =
        || std::fs::read_to_string("/proc/locks").unwrap_or_default().contains(&format!(" {} ", holder.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !locks_held() {
        assert!(std::time::Instant::now() < deadline, "flock never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    let bin = vmsniff::binary();
    let started = std::time::Instant::now();
    let out = hv.ns.enter(move || {
        std::process::Command::new(bin)
            .args(["attach", "--tap", TAP, "--to-dev", MIRROR_DEV])
            .env("VMSNIFF_LOCK_WAIT", "1")
            .output()
            .expect("start vmsniff")
    });
    let took = started.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach went ahead under someone else's lock");
    assert!(err.contains(&format!("pid {}", holder.id())) && err.contains("nothing was changed"), "{err}");
    assert!(took < Duration::from_secs(10), "waited {took:?}");
    assert_untouched(&hv.ns, &before);
}

#[test]
fn the_same_mirror_twice_is_refused_and_changes_nothing() {
    if !privileged_on_host(
        "the_same_mirror_twice_is_refused_and_changes_nothing",
        "refusing a duplicate reads vmsniff's own session state",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        let status = vmsniff::status(&hv.ns);
        let err = vmsniff::fails(&hv.ns, &["attach", "--tap", TAP, "--to-dev", MIRROR_DEV]);
        assert!(err.contains(&format!("already mirrored to device {MIRROR_DEV} by session {id}")), "{err}");
        assert_eq!(vmsniff::status(&hv.ns)["sessions"], status["sessions"]);
        let err = vmsniff::fails(&hv.ns, &["detach", "77"]);
        assert!(err.contains("no session 77"), "{err}");
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
    }
}

#[test]
fn a_killed_mirror_is_reported_then_cleaned_by_the_next_command() {
    if !privileged_on_host(
        "a_killed_mirror_is_reported_then_cleaned_by_the_next_command",
        "telling an orphan and replacing it are vmsniff's own bookkeeping",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let (mut child, id) =
            vmsniff::spawn_mirror(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        assert_eq!(vmsniff::session(&hv.ns, id)["state"], "active");
        child.kill().unwrap();
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(vmsniff::session(&hv.ns, id)["state"], "orphaned");

        let out =
            vmsniff::run(&hv.ns, &["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains(&format!("session {id} belonged to process")), "{err}");
        let sessions = vmsniff::status(&hv.ns)["sessions"].as_array().unwrap().clone();
        assert_eq!(sessions.len(), 1, "the orphan was replaced, not kept: {sessions:?}");
        assert_eq!(sessions[0]["state"], "active");
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
        assert!(!hv.ns.pin_dir().exists());
    }
}

#[test]
fn mirror_detaches_everything_on_sigterm() {
    if !privileged_on_host(
        "mirror_detaches_everything_on_sigterm",
        "the signal handling is vmsniff's; the detach it runs is checked in every guest by \
         datapath/both_directions_arrive_byte_identical_in_order_with_matching_counters",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let (child, _) =
            vmsniff::spawn_mirror(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!hv.ns.pin_dir().exists(), "mirror left pins after SIGTERM");
        let (_, filters, _) = hv.ns.try_sh(&format!("tc filter show dev {TAP} ingress"));
        assert!(!filters.contains("vmsniff"));
    }
}

/// The namespace's ABI version record, pinned beside vmsniff's maps.
fn abi_record(ns: &Netns) -> PathBuf {
    ns.pin_dir().join("maps").join(map_name::ABI)
}

fn open_abi_record(ns: &Netns) -> Array<MapData, u32> {
    let data = MapData::from_pin(abi_record(ns)).expect("the ABI version record");
    Array::try_from(Map::Array(data)).expect("a u32 array")
}

/// What vmsniff made in a namespace, as the kernel shows it: filters on the tap and the
/// mirror device, TCX programs on the tap, interfaces, pins.
fn kernel_view(ns: &Netns) -> String {
    let mut view = String::new();
    for (dev, hook) in [(TAP, "ingress"), (TAP, "egress"), (MIRROR_DEV, "egress")] {
        view += &run("tc", &["-n", &ns.name, "filter", "show", "dev", dev, hook]);
    }
    view += &format!("{:?} {:?}\n", ns.tcx_programs(TAP), ns.link_names());
    if ns.pin_dir().exists() {
        view += &run("find", &[&ns.pin_dir().to_string_lossy()]);
    }
    view
}

#[test]
fn state_of_another_abi_version_is_refused_untouched_and_detach_all_removes_it() {
    if !privileged_on_host(
        "state_of_another_abi_version_is_refused_untouched_and_detach_all_removes_it",
        "the version record is vmsniff's own bookkeeping; the tc and TCX detach it ends with is \
         checked in every guest by datapath/both_directions_arrive_byte_identical_in_order_with_matching_counters",
    ) {
        return;
    }
    let other = ABI_VERSION + 1;
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let before = hv.ns.link_names();
        // A snaplen, so that the target has a copy program for detach --all to find by name.
        let attach =
            ["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode, "--snaplen", "96"];
        let id = vmsniff::attach(&hv.ns, &attach[1..]);
        assert_eq!(open_abi_record(&hv.ns).get(&0, 0).unwrap(), ABI_VERSION, "attach records its version");
        open_abi_record(&hv.ns).set(0, other, 0).unwrap();
        // That version's GRE device as detach finds it by name and alias (a veth: this kernel may
        // have no ip_gre), and a device with the name but not the alias, which is not vmsniff's.
        hv.ns.sh("ip link add vms9-in type veth peer name vms9-peer
             ip link set vms9-in alias 'vmsniff session 9 in'
             ip link add vms8-in type veth peer name vms8-peer");
        let view = kernel_view(&hv.ns);

        let id = id.to_string();
        for args in [
            &["status"][..],
            &["status", "--json"],
            &attach,
            &["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--direction", "in"],
            &["update", &id, "--snaplen", "96"],
            &["detach", &id],
        ] {
            let err = vmsniff::fails(&hv.ns, args);
            for needle in [
                format!("ABI version {other},"),
                format!("this vmsniff is of ABI version {ABI_VERSION}"),
                "changed nothing".into(),
                "`vmsniff detach --all`".into(),
            ] {
                assert!(err.contains(&needle), "vmsniff {args:?}: {needle:?} not in {err}");
            }
            assert_eq!(kernel_view(&hv.ns), view, "vmsniff {args:?} changed the kernel's state");
        }

        // The fix the message names: this vmsniff's `detach --all` removes it by name.
        let out = vmsniff::run(&hv.ns, &["detach", "--all"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let filters = if mode == "tcx" { 1 } else { 3 };
        assert!(err.contains("removing it by name"), "{err}");
        assert!(err.contains(&format!("removed vmsniff's {filters} tc filter(s), 1 GRE device(s)")), "{err}");
        assert!(!hv.ns.pin_dir().exists(), "detach --all left pins");
        let view = kernel_view(&hv.ns);
        assert!(!view.contains("vmsniff"), "detach --all left a filter or TCX program: {view}");
        hv.ns.sh("ip link del vms8-in");
        assert_eq!(hv.ns.link_names(), before);

        vmsniff::attach(&hv.ns, &attach[1..]);
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
        assert!(!hv.ns.pin_dir().exists());
    }
}

#[test]
fn state_of_the_release_before_version_records_is_used_and_then_recorded() {
    if !privileged_on_host(
        "state_of_the_release_before_version_records_is_used_and_then_recorded",
        "the version record is vmsniff's own bookkeeping",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        // What a vmsniff from before version records left: the same maps, no record.
        std::fs::remove_file(abi_record(&hv.ns)).unwrap();

        assert_eq!(vmsniff::session(&hv.ns, id)["state"], "active");
        assert!(!abi_record(&hv.ns).exists(), "status wrote the record: it changes nothing");
        vmsniff::ok(&hv.ns, &["update", &id.to_string(), "--snaplen", "96"]);
        assert_eq!(open_abi_record(&hv.ns).get(&0, 0).unwrap(), ABI_VERSION, "a change records the version");
        assert_eq!(vmsniff::session(&hv.ns, id)["snaplen"], 96);
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
        assert!(!hv.ns.pin_dir().exists());
    }
}

#[test]
fn state_of_the_version_before_is_used_as_it_is_and_upgraded_by_the_first_change() {
    if !privileged_on_host(
        "state_of_the_version_before_is_used_as_it_is_and_upgraded_by_the_first_change",
        "the version record, the taps' direction summary and the tap index are vmsniff's own \
         bookkeeping; the programs that read them copy one direction or both on every kernel in \
         datapath/",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let before = hv.ns.link_names();
        let tap = hv.ns.ifindex(TAP);
        let inbound = ["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode, "--direction", "in"];
        let into_vm = vmsniff::attach(&hv.ns, &inbound);
        assert_eq!(summary(&hv.ns, tap), TAP_DIRECTIONS_KNOWN | Direction::In.bit());

        // What version 2 left: its record, tap entries whose summary word it kept reserved (0),
        // no tap index, and programs that look taps up in the taps map (as the attached ones do
        // with their slot marked shared).
        let old = ABI_VERSIONS_UPGRADABLE[0];
        open_abi_record(&hv.ns).set(0, old, 0).unwrap();
        let mut taps = open_taps(&hv.ns);
        let entry = TapSessions { directions: 0, ..taps.get(&tap, 0).unwrap() };
        taps.insert(tap, entry, 0).unwrap();
        let shared = TapIndexEntry { flags: TAP_INDEX_SHARED, ..TapIndexEntry::default() };
        open_tap_index(&hv.ns).set(tap_index_slot(tap), shared, 0).unwrap();
        std::fs::remove_file(tap_index_pin(&hv.ns)).unwrap();

        // Used as it is: without a summary the programs look at each session.
        let (out, into) = frames::both_ways(8);
        hv.vm_receives(&into);
        let copies = mirror.capture(into.len(), Duration::from_secs(10), is_marked);
        assert_frames_eq(&format!("[{mode}] copies into the VM, before the upgrade"), &into, &copies);
        assert_eq!(vmsniff::session(&hv.ns, into_vm)["state"], "active");
        assert_eq!(record(&hv.ns), old, "[{mode}] status changed the record");
        assert!(!tap_index_pin(&hv.ns).exists(), "[{mode}] status made the tap index");

        // The first change raises the record, and the tap's entry gets its summary.
        hv.ns.sh("ip link add mirb type veth peer name mirbp
             ip link set mirb up
             ip link set mirbp up");
        let outbound = ["--tap", TAP, "--to-dev", "mirb", "--attach-mode", mode, "--direction", "out"];
        let out_of_vm = vmsniff::attach(&hv.ns, &outbound);
        assert_eq!(record(&hv.ns), ABI_VERSION, "[{mode}] the first change raises the record");
        assert_eq!(summary(&hv.ns, tap), TAP_DIRECTIONS_KNOWN | Direction::In.bit() | Direction::Out.bit());
        let made = open_tap_index(&hv.ns).get(&tap_index_slot(tap), 0).unwrap();
        let entry = open_taps(&hv.ns).get(&tap, 0).unwrap();
        assert_eq!(
            made,
            TapIndexEntry::for_slot([(tap, &entry)]),
            "[{mode}] the first change makes the index"
        );
        hv.vm_sends(&out);
        hv.vm_receives(&into);
        let copies = mirror.capture(into.len(), Duration::from_secs(10), is_marked);
        assert_frames_eq(&format!("[{mode}] copies into the VM, after the upgrade"), &into, &copies);
        let sent = &vmsniff::session(&hv.ns, out_of_vm)["counters"]["out"]["frames"];
        assert_eq!(sent.as_u64(), Some(out.len() as u64), "[{mode}] copies of frames the VM sent");

        // Detached, the entry's summary follows its one session.
        vmsniff::ok(&hv.ns, &["detach", &into_vm.to_string()]);
        assert_eq!(summary(&hv.ns, tap), TAP_DIRECTIONS_KNOWN | Direction::Out.bit());
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
        assert!(!hv.ns.pin_dir().exists(), "[{mode}] detach --all left pins");
        hv.ns.sh("ip link del mirb");
        assert_eq!(hv.ns.link_names(), before);
    }
}

fn record(ns: &Netns) -> u32 {
    open_abi_record(ns).get(&0, 0).expect("the ABI version record's entry")
}

fn tap_index_pin(ns: &Netns) -> PathBuf {
    ns.pin_dir().join("maps").join(map_name::TAP_INDEX)
}

fn open_tap_index(ns: &Netns) -> Array<MapData, TapIndexEntry> {
    let data = MapData::from_pin(tap_index_pin(ns)).expect("the tap index");
    Array::try_from(Map::Array(data)).expect("the tap index's layout")
}

fn open_taps(ns: &Netns) -> HashMap<MapData, u32, TapSessions> {
    let data = MapData::from_pin(ns.pin_dir().join("maps").join(map_name::TAPS)).expect("the taps map");
    HashMap::try_from(Map::HashMap(data)).expect("the taps map's layout")
}

/// The direction summary of the tap's entry.
fn summary(ns: &Netns, tap: u32) -> u32 {
    open_taps(ns).get(&tap, 0).expect("the tap's entry").directions
}
