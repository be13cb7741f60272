//! The README's PromQL and the Grafana dashboard's queries, evaluated by a real Prometheus that
//! scrapes a `vmsniff daemon --metrics` and a `vmsniff collect --metrics` after a known scene:
//! each parses, and the loss budget gives the known numbers.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::time::{Duration, Instant};

use serde_json::Value;
use vmsniff_tests::{
    collect::{Collector, GreSender, gre},
    daemon::{Daemon, session_state},
    frames::{self, L4, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    privileged_on_host,
    prometheus::{self, Prometheus},
    skip,
    topology::{Hypervisor, MIRROR_DEV, TAP},
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
