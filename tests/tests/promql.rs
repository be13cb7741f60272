//! The README's PromQL and the Grafana dashboard's queries, evaluated by a real Prometheus that
//! scrapes a `vmsniff daemon --metrics` and a `vmsniff collect --metrics` after a known scene:
//! each parses, and the loss budget gives the known numbers. A second scene joins the two ends
//! for real (VXLAN and, where the kernel has ip_gre, GRE sessions toward one collector, with a
//! known number of copies lost on the way) and checks the share that never arrived.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::time::{Duration, Instant};

use serde_json::Value;
use vmsniff_tests::{
    collect::{Collector, GreSender, gre},
    daemon::{Daemon, session_state},
    frames::{self, L4, PEER_MAC, VM_MAC, is_marked},
    monitored::{COLLECTOR, HV, Monitored},
    netns::Netns,
    privileged_on_host, privileged_on_host_and_one_guest,
    prometheus::{self, Prometheus},
    skip,
    topology::{Hypervisor, MIRROR_DEV, TAP, VmPort},
};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The ```promql blocks of the README's Monitoring section.
fn readme_queries() -> Vec<String> {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let section = readme.split("\n## Monitoring\n").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    let queries: Vec<String> = section
        .split("```promql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_owned())
        .collect();
    assert!(queries.len() >= 2, "the Monitoring section's PromQL");
    queries
}

/// Every panel's (title, expr) of the dashboard, with Grafana's variables set as the scrape
/// config below names the jobs.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{ROOT}/packaging/grafana/vmsniff.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$hypervisor_job", "vmsniff")
                .replace("$collector_job", "vmsniff-collect")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h");
            assert!(!expr.contains('$'), "a variable this test does not set: {expr}");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    assert!(queries.len() >= 10, "the dashboard's queries");
    queries
}

/// `rate(M[w])` and `increase(M[w])` read as `M`: the counters' values now, which equal the
/// scene's counts exactly (every counter here started at 0 with the scene), where Prometheus's
/// extrapolation over a few seconds of samples would not.
fn as_totals(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    loop {
        let next = ["rate(", "increase("].iter().filter_map(|f| rest.find(f).map(|i| (i, f.len()))).min();
        let Some((at, len)) = next else { break };
        out.push_str(&rest[..at]);
        let inner = &rest[at + len..];
        let open = inner.find('[').unwrap();
        let close = inner[open..].find("])").unwrap() + open;
        out.push_str(&inner[..open]);
        rest = &inner[close + 2..];
    }
    out.push_str(rest);
    out
}

fn by(results: &[Value], labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Value> =
        results.iter().filter(|r| labels.iter().all(|(k, v)| r["metric"][*k].as_str() == Some(*v))).collect();
    assert_eq!(found.len(), 1, "{labels:?} in {results:#?}");
    prometheus::value(found[0])
}

#[test]
fn readme_and_dashboard_promql_give_the_known_loss_budget() {
    if !privileged_on_host(
        "readme_and_dashboard_promql_give_the_known_loss_budget",
        "the queries read metrics whose kernel side other tests check on every kernel",
    ) {
        return;
    }
    if !std::path::Path::new(prometheus::BINARY).exists() {
        skip(&format!("{} is missing: `cargo xtask setup` installs Debian's prometheus", prometheus::BINARY));
        return;
    }
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let collector_ns = Netns::new("pcol");
    let sender_ns = Netns::new("psnd");
    // The hypervisor's metrics reach the collector's namespace, where Prometheus runs, over a
    // veth; hand-made GRE reaches the collector from the sender's namespace.
    hv.ns.sh(&format!(
        "ip link add hvm0 type veth peer name colm0 netns {col}
         ip addr add 10.241.0.1/24 dev hvm0; ip link set hvm0 up",
        col = collector_ns.name
    ));
    collector_ns.sh("ip addr add 10.241.0.2/24 dev colm0; ip link set colm0 up");
    sender_ns.sh(&format!(
        "ip link add snd0 type veth peer name col0 netns {col}
         ip addr add 10.240.0.1/24 dev snd0; ip link set snd0 up",
        col = collector_ns.name
    ));
    collector_ns.sh("ip addr add 10.240.0.2/24 dev col0; ip link set col0 up");

    let daemon = Daemon::start(
        &hv.ns,
        &format!(
            "[daemon]\nmetrics = \"10.241.0.1:9466\"\n\n[session.vm0]\ntap = \"{TAP}\"\nto-dev = \
             \"{MIRROR_DEV}\"\nfilter = \"not udp\"\n"
        ),
    );
    daemon.wait_for(&hv.ns, "session vm0 active", |s| session_state(s, "vm0").0 == "active");
    let file = std::env::temp_dir().join(format!("vmsniff-promql-{}.pcapng", std::process::id()));
    let collector =
        Collector::start(&collector_ns, &["-w", file.to_str().unwrap(), "--metrics", "127.0.0.1:9467"]);
    let prometheus = Prometheus::start(
        &collector_ns,
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: vmsniff\n    static_configs:\n      - \
         targets: ['10.241.0.1:9466']\n        labels: {sender: '10.240.0.1'}\n  - job_name: \
         vmsniff-collect\n    static_configs:\n      - targets: ['127.0.0.1:9467']\n",
    );

    // The scene: 10 TCP frames out, copied; 6 UDP frames out, filtered (not copied by choice).
    let (out, _) = frames::both_ways(10);
    hv.vm_sends(&out);
    assert_eq!(mirror.capture(10, Duration::from_secs(10), is_marked).len(), 10);
    let udp = (0..6)
        .map(|i| {
            frames::ipv4(VM_MAC, PEER_MAC, [10, 1, 2, 3], [10, 9, 9, 9], L4::Udp(4000, 5000), 100 + i, 300)
        })
        .collect::<Vec<_>>();
    hv.vm_sends(&udp);
    // The session's key as the daemon's series label it; the collector receives its copies
    // from the sender as GRE numbered 1..=10 without 4 and 7: 2 lost on the way.
    let wait = |expr: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = prometheus.query(expr);
            if got.len() == 1 && prometheus::value(&got[0]) == want {
                return got[0].clone();
            }
            assert!(Instant::now() < deadline, "{expr}: {got:?}, not {want}\n{}", prometheus.log());
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let copies = wait("vmsniff_copies_total{job=\"vmsniff\",direction=\"out\"}", 10.0);
    // A --to-dev session has no key of its own: its copies are numbered as session 1's would be.
    let key: u32 = copies["metric"]["session"].as_str().unwrap().parse().unwrap();
    let sender = GreSender::open(&sender_ns, [10, 240, 0, 1]);
    for seq in (1..=10).filter(|s| *s != 4 && *s != 7) {
        sender.send(
            [10, 240, 0, 2],
            &gre(Some(key * 2), Some(seq), 0x6558, &frames::frame(VM_MAC, PEER_MAC, seq, 100)),
        );
    }
    wait("vmsniff_collect_lost_total", 2.0);
    wait("vmsniff_not_copied_total{reason=\"filtered\",direction=\"out\"}", 6.0);
    // Two more scrapes, so that every rate() has two samples of each series.
    std::thread::sleep(Duration::from_secs(3));

    // Every query parses and answers, as written (rates over the scene's few seconds).
    let readme = readme_queries();
    let dashboard = dashboard_queries();
    for expr in readme.iter().chain(dashboard.iter().map(|(_, e)| e)) {
        prometheus.query(expr);
        prometheus.query(&as_totals(expr));
    }

    // The budget: by stage and reason, the exact counts.
    for budget in [&readme[0], &dashboard[0].1] {
        let totals = prometheus.query(&as_totals(budget));
        let stage = |stage, reason| by(&totals, &[("stage", stage), ("reason", reason)]);
        assert_eq!(stage("1 not copied by choice", "filtered"), 6.0, "{totals:#?}");
        assert_eq!(stage("1 not copied by choice", "sampled-out"), 0.0);
        assert_eq!(stage("1 not copied by choice", "rate-limited"), 0.0);
        assert_eq!(stage("2 failed at the source", "clone-error"), 0.0);
        assert_eq!(stage("2 failed at the source", "snaplen-refused"), 0.0);
        assert_eq!(stage("3 lost on the way", "sequence-gap"), 2.0);
        // A --to-dev session has no tunnel device of its own: no device errors to count.
        assert!(!totals.iter().any(|r| r["metric"]["reason"] == "device-error"), "{totals:#?}");
        // And as written: rates, all of them present.
        let rates = prometheus.query(budget);
        assert_eq!(rates.len(), totals.len(), "{rates:#?}");
    }
    // The share of offered frames per stage: 10 copied of 16, 6 filtered.
    let shares = prometheus.query(&as_totals(&dashboard[1].1));
    assert_eq!(by(&shares, &[("stage", "0 copied")]), 10.0 / 16.0, "{shares:#?}");
    assert_eq!(by(&shares, &[("stage", "1 not copied by choice")]), 6.0 / 16.0);
    assert_eq!(by(&shares, &[("stage", "2 failed at the source")]), 0.0);

    drop(prometheus);
    drop(collector);
    let _ = std::fs::remove_file(&file);
    drop(daemon);
    vmsniff_tests::vmsniff::ok(&hv.ns, &["detach", "--all"]);
}

/// Copies of one session that the scene sends and loses: `SENT_BEFORE` frames out arrive,
/// `LOST` are diverted on the hypervisor's uplink, `SENT_AFTER` arrive; `INTO` frames into
/// the VM arrive.
const SENT_BEFORE: u32 = 10;
const LOST: u32 = 4;
const SENT_AFTER: u32 = 6;
const INTO: u32 = 5;

/// The u32 match of one encapsulation's copies on the hypervisor's uplink.
fn copies_match(encap: &str) -> &'static str {
    match encap {
        "vxlan" => "match ip protocol 17 0xff match ip dport 4789 0xffff",
        _ => "match ip protocol 47 0xff",
    }
}

/// The README's "share of copies sent that never arrived" and the dashboard's panel of it,
/// evaluated across a real join: a VXLAN session (and, where the kernel has ip_gre, a GRE
/// session) of `vmsniff daemon` toward `vmsniff collect`, the hypervisor target labelled with
/// its underlay address as the README's scrape config says, and a known number of each
/// session's copies diverted away from the collector on the hypervisor's uplink.
#[test]
fn the_share_never_arrived_joins_both_ends_per_session() {
    if !privileged_on_host_and_one_guest(
        "the_share_never_arrived_joins_both_ends_per_session",
        "the GRE half needs ip_gre (bookworm's kernel has it); the VXLAN half runs on the host",
    ) {
        return;
    }
    if !std::path::Path::new(prometheus::BINARY).exists() {
        skip(&format!("{} is missing: `cargo xtask setup` installs Debian's prometheus", prometheus::BINARY));
        return;
    }
    let probe = Netns::new("probe");
    let vxlan = probe.try_sh("ip link add v0 type vxlan id 1 remote 192.0.2.1 dstport 4789").0;
    let gre = probe.try_sh("ip link add g0 type gretap remote 192.0.2.1").0;
    drop(probe);
    if !gre {
        eprintln!("this kernel cannot make gretap devices: the GRE session is left out here");
    }
    if !vxlan {
        skip("this kernel cannot make vxlan devices");
        return;
    }
    // (config name, encap, key, tap): key 7 on the first VM over VXLAN, key 9 on a second
    // VM over GRE.
    let mut sessions = vec![("vx", "vxlan", 7u32, TAP)];
    if gre {
        sessions.push(("gr", "gre", 9, "tapvm1"));
    }

    let mut hv = Hypervisor::new();
    let mut second = gre.then(|| hv.add_vm("tapvm1", 1));
    let tables: String = sessions
        .iter()
        .map(|(name, encap, key, tap)| {
            format!("[session.{name}]\ntap = \"{tap}\"\nto = \"{COLLECTOR}\"\nencap = \"{encap}\"\nkey = {key}\n\n")
        })
        .collect();
    let names: Vec<&str> = sessions.iter().map(|s| s.0).collect();
    let scene = Monitored::start(&hv, &tables, &names, 1);
    let prometheus = &scene.prometheus;

    // Small frames: their copies are never fragmented, so one copy is one packet to divert.
    let out = |range: std::ops::Range<u32>| -> Vec<Vec<u8>> {
        range.map(|n| frames::frame(VM_MAC, PEER_MAC, n, 100)).collect()
    };
    let send = |hv: &mut Hypervisor, second: &mut Option<VmPort>, frames: &[Vec<u8>]| {
        hv.vm_sends(frames);
        if let Some(port) = second.as_mut() {
            port.vm_sends(frames);
        }
    };
    let wait = |expr: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = prometheus.query(expr);
            if got.len() == 1 && prometheus::value(&got[0]) == want {
                return;
            }
            assert!(Instant::now() < deadline, "{expr}: {got:?}, not {want}\n{}", prometheus.log());
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let arrived = |encap: &str, direction: &str, want: u32| {
        wait(
            &format!("vmsniff_collect_packets_total{{encap=\"{encap}\",direction=\"{direction}\"}}"),
            f64::from(want),
        );
    };

    send(&mut hv, &mut second, &out(0..SENT_BEFORE));
    let into: Vec<Vec<u8>> = (0..INTO).map(|n| frames::frame(PEER_MAC, VM_MAC, 100 + n, 100)).collect();
    hv.vm_receives(&into);
    if let Some(port) = second.as_mut() {
        port.vm_receives(&into);
    }
    for (_, encap, ..) in &sessions {
        arrived(encap, "out", SENT_BEFORE);
        arrived(encap, "in", INTO);
    }
    // The loss: every copy toward the collector goes to the sink while the VMs send LOST
    // frames; the sink counts them, so none is still on its way when the rule goes.
    for (prio, (_, encap, ..)) in (1..).zip(&sessions) {
        scene.divert(prio, copies_match(encap));
    }
    send(&mut hv, &mut second, &out(SENT_BEFORE..SENT_BEFORE + LOST));
    let diverted = u64::from(LOST) * sessions.len() as u64;
    scene.wait_diverted(diverted);
    scene.stop_diverting();
    assert_eq!(scene.diverted(), diverted, "the sink had the lost copies only");
    send(&mut hv, &mut second, &out(SENT_BEFORE + LOST..SENT_BEFORE + LOST + SENT_AFTER));

    let sent = SENT_BEFORE + LOST + SENT_AFTER;
    for (_, encap, ..) in &sessions {
        wait(
            &format!("vmsniff_copies_total{{job=\"vmsniff\",encap=\"{encap}\",direction=\"out\"}}"),
            f64::from(sent),
        );
        wait(
            &format!("vmsniff_copies_total{{job=\"vmsniff\",encap=\"{encap}\",direction=\"in\"}}"),
            f64::from(INTO),
        );
        arrived(encap, "out", SENT_BEFORE + SENT_AFTER);
    }
    if gre {
        // GRE's sequence numbers tell the gap at the collector.
        wait("vmsniff_collect_lost_total{encap=\"gre\",direction=\"out\"}", f64::from(LOST));
    }
    // Two more scrapes, so that every increase() has two samples of each series.
    std::thread::sleep(Duration::from_secs(3));

    // The README's query and the dashboard's panel: per (sender, key, direction), exactly the
    // share lost, 4 of 20 out and none of 5 in, for each session; nothing else.
    let readme = readme_queries();
    let share =
        readme.iter().find(|q| q.contains("vmsniff_collect_lost_total") && q.contains("/ on")).unwrap();
    let panel =
        dashboard_queries().into_iter().find(|(title, _)| title.starts_with("Lost on the way")).unwrap().1;
    for expr in [share, &panel] {
        let shares = prometheus.query(&as_totals(expr));
        for (_, encap, key, _) in &sessions {
            let key = key.to_string();
            let of = |direction| by(&shares, &[("sender", HV), ("key", &key), ("direction", direction)]);
            assert_eq!(of("out"), f64::from(LOST) / f64::from(sent), "{encap} out: {expr}\n{shares:#?}");
            assert_eq!(of("in"), 0.0, "{encap} in: {expr}\n{shares:#?}");
        }
        assert_eq!(shares.len(), 2 * sessions.len(), "one share per session and direction: {shares:#?}");
        // As written (increase() over the scene's few seconds): the same series.
        assert_eq!(prometheus.query(expr).len(), shares.len(), "{expr}");
    }

    drop(scene);
    vmsniff_tests::vmsniff::ok(&hv.ns, &["detach", "--all"]);
}
