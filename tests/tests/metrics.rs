//! `--metrics`: a real scrape over HTTP of `vmsniff daemon` after a known number of frames and
//! of copies dropped on purpose, checked against `status --json`, across an adoption; and of
//! `vmsniff collect` fed hand-made GRE, checked against its summary.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::{net::TcpListener, time::Duration};

use nix::sys::signal::Signal;
use serde_json::Value;
use vmsniff_tests::{
    collect::{Collector, GreSender, closing_count, gre, summary},
    daemon::{Daemon, session_state},
    frames::{self, L4, PEER_MAC, VM_MAC, is_marked},
    metrics::{Sample, get, scrape, value},
    netns::Netns,
    privileged_on_host,
    topology::{Hypervisor, MIRROR_DEV, TAP},
    vmsniff,
};

const PORT: u16 = 9466;
const QUIET: Duration = Duration::from_millis(500);

fn config(mode: &str) -> String {
    format!(
        "[daemon]\nmetrics = \"127.0.0.1:{PORT}\"\n\n[session.vm0]\ntap = \"{TAP}\"\nto-dev = \
         \"{MIRROR_DEV}\"\nattach-mode = \"{mode}\"\nfilter = \"not udp\"\n"
    )
}

fn udp(src: [u8; 6], dst: [u8; 6], seq: u32) -> Vec<u8> {
    frames::ipv4(src, dst, [10, 1, 2, 3], [10, 9, 9, 9], L4::Udp(4000, 5000), seq, 300)
}

fn sessions(status: &Value) -> Vec<Value> {
    status["sessions"].as_array().unwrap().clone()
}

/// Every counter of every session of `status --json`, in each direction it mirrors, equals
/// its metric.
fn assert_metrics_match_status(samples: &[Sample], status: &Value) {
    for s in sessions(status) {
        let id = s["session"].to_string();
        let directions = match s["direction"].as_str().unwrap() {
            "both" => vec!["in", "out"],
            one => vec![one],
        };
        for direction in directions {
            let c = &s["counters"][direction];
            let l = [("session", id.as_str()), ("direction", direction)];
            let field = |name: &str| c[name].as_u64().unwrap_or_else(|| panic!("{name} in {c}"));
            assert_eq!(
                value(samples, "vmsniff_copies_total", &l),
                field("frames"),
                "session {id} {direction}"
            );
            assert_eq!(value(samples, "vmsniff_copy_bytes_total", &l), field("bytes"));
            assert_eq!(value(samples, "vmsniff_truncated_total", &l), field("truncated"));
            for reason in ["filtered", "sampled-out", "rate-limited"] {
                let l = [l[0], l[1], ("reason", reason)];
                assert_eq!(
                    value(samples, "vmsniff_not_copied_total", &l),
                    field(reason),
                    "{id} {direction} {reason}"
                );
            }
            // One reason per failed copy, as status counts them.
            for (reason, expected) in
                [("clone-error", field("clone-errors")), ("snaplen-refused", field("snaplen-refused"))]
            {
                let l = [l[0], l[1], ("reason", reason)];
                assert_eq!(
                    value(samples, "vmsniff_copy_failures_total", &l),
                    expected,
                    "{id} {direction} {reason}"
                );
            }
        }
    }
}

/// A daemon that must not start: `args` given, the port held by someone else or malformed.
fn refused_start(ns: &Netns, dir: &std::path::Path, args: &[&str], why: &str) {
    let config = dir.join("mirrors.toml");
    let run_dir = dir.join("run");
    let mut all =
        vec!["daemon", "--config", config.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()];
    all.extend(args);
    let stderr = vmsniff::fails(ns, &all);
    assert!(stderr.contains(why), "{why:?} in: {stderr}");
    assert!(!ns.pin_dir().exists(), "a refused start attached nothing: {stderr}");
    assert!(sessions(&vmsniff::status(ns)).is_empty());
}

#[test]
fn daemon_metrics_count_what_status_counts_and_go_on_across_an_adoption() {
    if !privileged_on_host(
        "daemon_metrics_count_what_status_counts_and_go_on_across_an_adoption",
        "the metrics are `status` read over HTTP; the counters' kernel side is tested on every kernel elsewhere",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();

        // Bad addresses stop the start, changing nothing.
        let dir = std::env::temp_dir().join(format!("vmsniff-metrics-{}-{mode}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mirrors.toml"), config(mode)).unwrap();
        let holder = hv.ns.enter(|| TcpListener::bind(("127.0.0.1", PORT)).unwrap());
        refused_start(&hv.ns, &dir, &[], "the port is in use");
        drop(holder);
        refused_start(&hv.ns, &dir, &["--metrics", "localhost:9466"], "is not ADDR:PORT");
        refused_start(&hv.ns, &dir, &["--metrics", "192.0.2.77:9466"], "not one of this host's");
        std::fs::remove_dir_all(&dir).unwrap();

        let mut daemon = Daemon::start(&hv.ns, &config(mode));
        let status = daemon.wait_for(&hv.ns, "session vm0 active", |s| session_state(s, "vm0").0 == "active");
        let id = session_state(&status, "vm0").1.unwrap().to_string();
        // A session made by hand beside the daemon's: out only, cut to 20 bytes, which UDP
        // frames are too short for (their copies are dropped, counted as snaplen-refused).
        hv.ns.sh("ip link add mir2 type veth peer name mir3; ip link set mir2 up; ip link set mir3 up");
        let by_hand = vmsniff::attach(
            &hv.ns,
            &[
                "--tap",
                TAP,
                "--to-dev",
                "mir2",
                "--snaplen",
                "20",
                "--direction",
                "out",
                "--attach-mode",
                mode,
            ],
        )
        .to_string();

        // 10 frames each way, copied; 6 UDP frames out and 4 in, which vm0's filter drops.
        let (out, into) = frames::both_ways(10);
        hv.vm_sends(&out);
        assert_eq!(mirror.capture(10, Duration::from_secs(10), is_marked).len(), 10);
        hv.vm_receives(&into);
        assert_eq!(mirror.capture(10, Duration::from_secs(10), is_marked).len(), 10);
        hv.vm_sends(&(0..6).map(|i| udp(VM_MAC, PEER_MAC, 100 + i)).collect::<Vec<_>>());
        hv.vm_receives(&(0..4).map(|i| udp(PEER_MAC, VM_MAC, 200 + i)).collect::<Vec<_>>());
        mirror.drain(QUIET, |_| true);

        let before = vmsniff::status(&hv.ns);
        let samples = scrape(&hv.ns, PORT);
        let again = scrape(&hv.ns, PORT);
        let after = vmsniff::status(&hv.ns);
        assert_eq!(sessions(&before), sessions(&after), "scraping changes nothing");
        // Series come in no set order within a family.
        let sorted = |mut samples: Vec<Sample>| {
            samples.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
            samples
        };
        assert_eq!(sorted(samples.clone()), sorted(again), "nothing moved, so two scrapes agree");
        assert_metrics_match_status(&samples, &after);

        // The figures themselves, and the labels.
        let vm0 = |direction| [("session", id.as_str()), ("direction", direction)];
        assert_eq!(value(&samples, "vmsniff_copies_total", &vm0("out")), 10);
        assert_eq!(value(&samples, "vmsniff_copies_total", &vm0("in")), 10);
        let filtered =
            |d| value(&samples, "vmsniff_not_copied_total", &[vm0(d)[0], vm0(d)[1], ("reason", "filtered")]);
        assert_eq!((filtered("out"), filtered("in")), (6, 4));
        let refused = value(
            &samples,
            "vmsniff_copy_failures_total",
            &[("session", &by_hand), ("direction", "out"), ("reason", "snaplen-refused")],
        );
        assert_eq!(refused, 6, "every UDP copy of the hand-made session is refused");
        let clone_errors = value(
            &samples,
            "vmsniff_copy_failures_total",
            &[("session", &by_hand), ("direction", "out"), ("reason", "clone-error")],
        );
        assert_eq!(clone_errors, 0, "a refused copy has one reason");
        let labels = &samples
            .iter()
            .find(|s| s.name == "vmsniff_copies_total" && s.labels["session"] == id)
            .unwrap()
            .labels;
        for (k, v) in
            [("config", "vm0"), ("mode", "ebpf"), ("tap", TAP), ("collector", "dev:mir0"), ("encap", "none")]
        {
            assert_eq!(labels[k], v, "{k} in {labels:?}");
        }
        let labels = &samples
            .iter()
            .find(|s| s.name == "vmsniff_copies_total" && s.labels["session"] == by_hand)
            .unwrap()
            .labels;
        assert_eq!((labels["config"].as_str(), labels["collector"].as_str()), ("", "dev:mir2"));
        assert!(!samples.iter().any(|s| s.labels.get("session") == Some(&by_hand)
            && s.labels.get("direction").is_some_and(|d| d == "in")));
        assert!(
            !samples.iter().any(|s| s.name.starts_with("vmsniff_device_")),
            "--to-dev devices are not the session's"
        );
        assert_eq!(
            value(&samples, "vmsniff_daemon_session_state", &[("config", "vm0"), ("state", "active")]),
            1
        );
        assert_eq!(
            value(&samples, "vmsniff_daemon_session_state", &[("config", "vm0"), ("state", "error")]),
            0
        );
        assert_eq!(value(&samples, "vmsniff_session_state", &[("session", &id), ("state", "active")]), 1);
        assert_eq!(value(&samples, "vmsniff_build_info", &[]), 1);
        let (status_line, _, body) = get(&hv.ns, PORT, "/");
        assert!(status_line.ends_with("404 Not Found") && body.contains("/metrics"), "{status_line}: {body}");

        // kill -9, then a new daemon adopts the session: its counters go on from the kernel's.
        daemon.stop_with(Signal::SIGKILL);
        daemon.spawn(&hv.ns);
        daemon.wait_for(&hv.ns, "vm0 adopted", |s| {
            session_state(s, "vm0") == ("active".into(), id.parse().ok())
        });
        let (out, _) = frames::both_ways(3);
        hv.vm_sends(&out);
        assert_eq!(mirror.capture(3, Duration::from_secs(10), is_marked).len(), 3);
        let samples = scrape(&hv.ns, PORT);
        assert_metrics_match_status(&samples, &vmsniff::status(&hv.ns));
        assert_eq!(value(&samples, "vmsniff_copies_total", &vm0("out")), 13, "monotonic across the adoption");

        // Detach and attach again: a new session, whose counters start from 0 (a counter reset
        // to Prometheus) and whose start time says so; the old one's series are gone.
        let hand = |samples: &[Sample]| {
            let l = [("session", by_hand.as_str()), ("direction", "out")];
            (
                value(samples, "vmsniff_copies_total", &l),
                value(samples, "vmsniff_session_start_time_seconds", &l[..1]),
            )
        };
        let (copies, started) = hand(&samples);
        assert_eq!(copies, 13);
        vmsniff::ok(&hv.ns, &["detach", &by_hand]);
        assert!(!scrape(&hv.ns, PORT).iter().any(|s| s.labels.get("session") == Some(&by_hand)));
        let again = vmsniff::attach(
            &hv.ns,
            &["--tap", TAP, "--to-dev", "mir2", "--direction", "out", "--attach-mode", mode],
        );
        assert_eq!(again.to_string(), by_hand, "the lowest free id again");
        let (copies, restarted) = hand(&scrape(&hv.ns, PORT));
        assert_eq!(copies, 0, "a new session counts from 0");
        assert!(restarted >= started);

        assert!(daemon.stop_with(Signal::SIGTERM), "the daemon stops cleanly:\n{}", daemon.log());
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
    }
}

#[test]
fn collect_metrics_count_what_its_summary_counts() {
    if !privileged_on_host(
        "collect_metrics_count_what_its_summary_counts",
        "collect counts in user space what a raw socket receives",
    ) {
        return;
    }
    let sender_ns = Netns::new("msnd");
    let collector_ns = Netns::new("mcol");
    sender_ns.sh(&format!(
        "ip link add snd0 type veth peer name col0 netns {col}
         ip addr add 10.240.0.1/24 dev snd0
         ip addr add 10.240.0.3/24 dev snd0
         ip link set snd0 up",
        col = collector_ns.name
    ));
    collector_ns.sh("ip addr add 10.240.0.2/24 dev col0; ip link set col0 up");
    let file = std::env::temp_dir().join(format!("vmsniff-metrics-collect-{}.pcapng", std::process::id()));
    let port = PORT.to_string();
    let listen = format!("127.0.0.1:{port}");
    // A port in use stops collect before it writes anything.
    let holder = collector_ns.enter(|| TcpListener::bind(("127.0.0.1", PORT)).unwrap());
    let stderr =
        vmsniff::fails(&collector_ns, &["collect", "-w", file.to_str().unwrap(), "--metrics", &listen]);
    assert!(stderr.contains("the port is in use"), "{stderr}");
    assert!(!file.exists(), "no capture file after a refused start");
    drop(holder);

    let collector = Collector::start(
        &collector_ns,
        &["-w", file.to_str().unwrap(), "--from", "10.240.0.1/32", "--metrics", &listen],
    );
    let (listed, stranger) =
        (GreSender::open(&sender_ns, [10, 240, 0, 1]), GreSender::open(&sender_ns, [10, 240, 0, 3]));
    let to = [10, 240, 0, 2];
    let frame = |seq: u32, len| frames::frame(VM_MAC, PEER_MAC, seq, len);
    // Key 4: out numbered 10..=15 without 13 (one copy lost on the way), in 100..=102.
    for (i, seq) in [10, 11, 12, 14, 15].into_iter().enumerate() {
        listed.send(to, &gre(Some(4 * 2), Some(seq), 0x6558, &frame(i as u32, 100)));
    }
    for seq in 100..=102 {
        listed.send(to, &gre(Some(4 * 2 + 1), Some(seq), 0x6558, &frame(seq, 200)));
    }
    // A plain GRE mirror (no sequence numbers: left out), two malformed packets, a stranger.
    listed.send(to, &gre(Some(77), None, 0x6558, &frame(7, 60)));
    listed.send(to, &[0x30, 0x00, 0x65]);
    listed.send(to, &gre(Some(8), Some(1), 0x0800, &frame(8, 60)));
    for seq in 0..5 {
        stranger.send(to, &gre(Some(4 * 2), Some(seq), 0x6558, &frame(seq, 60)));
    }
    std::thread::sleep(QUIET);
    let samples = scrape(&collector_ns, PORT);
    let stopped = collector.stop();
    assert!(stopped.status.success(), "collect: {}", stopped.stderr);
    let _ = std::fs::remove_file(&file);
    let (rows, closing) = summary(&stopped.stderr);

    for row in &rows {
        let key = row.session.to_string();
        let direction = if row.direction == "-" { "" } else { row.direction.as_str() };
        let l = [
            ("sender", row.sender.as_str()),
            ("key", key.as_str()),
            ("direction", direction),
            ("encap", row.encap.as_str()),
        ];
        assert_eq!(value(&samples, "vmsniff_collect_packets_total", &l), row.packets, "{row:?}");
        assert_eq!(value(&samples, "vmsniff_collect_bytes_total", &l), row.bytes, "{row:?}");
        match (row.lost, row.reordered) {
            (Some(lost), Some(reordered)) => {
                assert_eq!(value(&samples, "vmsniff_collect_lost_total", &l), lost, "{row:?}");
                assert_eq!(value(&samples, "vmsniff_collect_reordered_total", &l), reordered, "{row:?}");
            }
            _ => assert!(
                !samples.iter().any(|s| s.name == "vmsniff_collect_lost_total" && s.labels["key"] == key)
            ),
        }
    }
    let out = [("sender", "10.240.0.1"), ("key", "4"), ("direction", "out")];
    assert_eq!(value(&samples, "vmsniff_collect_lost_total", &out), 1);
    assert_eq!(value(&samples, "vmsniff_collect_packets_total", &out), 5);
    let undecodable: u64 = samples
        .iter()
        .filter(|s| s.name == "vmsniff_collect_undecodable_total")
        .map(|s| s.value as u64)
        .sum();
    assert_eq!(undecodable, closing_count(&closing, "undecodable "));
    assert_eq!(undecodable, 2);
    assert_eq!(
        value(&samples, "vmsniff_collect_undecodable_total", &[("reason", "truncated-gre-header")]),
        1
    );
    assert_eq!(
        value(&samples, "vmsniff_collect_refused_total", &[("reason", "not-from")]),
        closing_count(&closing, "(not --from) ")
    );
    assert_eq!(value(&samples, "vmsniff_collect_refused_total", &[("reason", "not-from")]), 5);
    assert_eq!(value(&samples, "vmsniff_collect_socket_drops_total", &[]), 0);
    // The plain GRE mirror is left out without --plain-gre: counted, not written.
    assert_eq!(value(&samples, "vmsniff_collect_refused_total", &[("reason", "plain-gre")]), 1);
    assert_eq!(closing_count(&closing, "--plain-gre records it) "), 1, "{closing}");
    assert_eq!(value(&samples, "vmsniff_collect_written_total", &[]), 8);
    assert_eq!(value(&samples, "vmsniff_collect_streams", &[]), rows.len() as u64);
}
