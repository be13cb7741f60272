//! `cargo xtask bench --fleet`: what the fleet's size costs one node. A real etcd holds N
//! declared mirrors of VMs elsewhere plus one of this node's VM; a node (a namespace with the
//! VM's tap, its libvirt test-driver XML and a daemon passing every second) keeps it. Per N:
//! how long the node takes to load the fleet and attach, its pass time (from the daemon's
//! state file), and its etcd traffic (bytes relayed into the namespace) at start and steady.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use vmsniff_tests::{daemon::Daemon, etcd::Etcd, topology::Hypervisor, vmsniff};

const DOMAIN: &str = r#"<node><domain type='test'>
  <name>instance-00000042</name>
  <uuid>4242a9c1-7b4d-4e8f-9a6b-1c2d3e4f5a42</uuid>
  <metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:name>c-local</nova:name></nova:instance></metadata>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><interface type='bridge'><mac address='52:54:00:aa:00:01'/><source bridge='br0'/><target dev='tapvm0'/></interface></devices>
</domain></node>"#;

/// One size's figures.
struct Row {
    declared: usize,
    load: Duration,
    load_bytes: u64,
    pass_ms: Vec<f64>,
    steady_bytes_per_s: f64,
}

pub fn run(quick: bool) -> anyhow::Result<String> {
    let sizes: &[usize] = if quick { &[0, 1_000] } else { &[0, 1_000, 10_000] };
    let steady = Duration::from_secs(if quick { 4 } else { 10 });
    let mut rows = Vec::new();
    for &n in sizes {
        super::check_interrupted()?;
        eprintln!("bench: fleet of {n} declared mirrors elsewhere");
        rows.push(one(n, steady)?);
    }
    Ok(render(&rows, steady))
}

fn one(n: usize, steady: Duration) -> anyhow::Result<Row> {
    let etcd =
        Etcd::start().context("the fleet benchmark needs etcd: `cargo xtask setup` installs etcd-server")?;
    // Mirrors of VMs on other nodes, written as `vmsniff fleet mirror` writes them.
    let mut pairs = Vec::with_capacity(2 * n);
    for i in 0..n {
        let (name, key) = (format!("m{i}"), i + 2);
        let record = serde_json::json!({
            "version": 1, "name": name, "args": [format!("vm-{i}"), "--to", "192.0.2.2"],
            "key": key, "created": 0, "updated": 0,
        });
        pairs.push((format!("/vmsniff/mirrors/{name}"), record.to_string()));
        pairs.push((format!("/vmsniff/keys/{key}"), name));
    }
    etcd.put_all(&pairs);
    let hv = Hypervisor::new();
    hv.mirror_port();
    etcd.reach_from(&hv.ns);
    let ep = etcd.endpoint();
    vmsniff::ok(&hv.ns, &["fleet", "--endpoints", &ep, "mirror", "local", "c-local", "--to-dev", "mir0"]);
    let xml = etcd.dir.join("node.xml");
    std::fs::write(&xml, DOMAIN)?;
    let config = format!(
        "[daemon]\nresync-seconds = 1\n\n[fleet]\nendpoints = [\"{ep}\"]\nnode = \"bench\"\nreport-seconds = 5\n"
    );
    let before = etcd.relayed_bytes();
    let started = Instant::now();
    let daemon = Daemon::start_with(&hv.ns, &config, &["--connect", &format!("test://{}", xml.display())]);
    let state = Path::new(&daemon.run_dir()).join("daemon.json");
    let read = || -> Option<serde_json::Value> { serde_json::from_slice(&std::fs::read(&state).ok()?).ok() };
    let ready = |s: &serde_json::Value| {
        s["fleet"]["declared"] == n + 1 && s["sessions"]["fleet/local"]["state"] == "active"
    };
    while !read().is_some_and(|s| ready(&s)) {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the node did not load a fleet of {n} within 120 s:\n{}", daemon.log());
        }
        super::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let load = started.elapsed();
    let load_bytes = etcd.relayed_bytes() - before;
    let (from, at) = (etcd.relayed_bytes(), Instant::now());
    let mut pass_ms = Vec::new();
    // The pass that attached (seen on the state file now) is not a steady one.
    let mut last = read().map(|s| (s["last-pass-micros"].clone(), s["reloads"].clone()));
    while at.elapsed() < steady {
        if let Some(s) = read() {
            let micros = s["last-pass-micros"].as_u64();
            let reloads = (s["last-pass-micros"].clone(), s["reloads"].clone());
            if micros.is_some() && last.as_ref() != Some(&reloads) {
                pass_ms.extend(micros.map(|m| m as f64 / 1000.0));
                last = Some(reloads);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let steady_bytes_per_s = (etcd.relayed_bytes() - from) as f64 / at.elapsed().as_secs_f64();
    drop(daemon);
    Ok(Row { declared: n, load, load_bytes, pass_ms, steady_bytes_per_s })
}

fn render(rows: &[Row], steady: Duration) -> String {
    let mut out = String::from(
        "## The fleet: declared mirrors vs one node's work\n\n\
         One node whose VM has one fleet mirror, in a fleet of N other declared mirrors (VMs on \
         other nodes), a real etcd, the daemon passing every second. *Load*: from the daemon's \
         start until it runs its mirror, and the etcd bytes it moved meanwhile. *Pass*: a pass's \
         time as the daemon records it (median, min-max over the steady phase). *Steady*: etcd \
         bytes per second afterwards (lease keep-alives and reports; the watch is quiet).\n\n\
         | declared elsewhere | load | load bytes | pass (median) | pass (min-max) | steady etcd traffic |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mut p = r.pass_ms.clone();
        p.sort_by(f64::total_cmp);
        let median = p.get(p.len() / 2).copied().unwrap_or(f64::NAN);
        out.push_str(&format!(
            "| {} | {:.2} s | {} KiB | {median:.2} ms | {:.2}-{:.2} ms | {:.0} B/s |\n",
            r.declared,
            r.load.as_secs_f64(),
            r.load_bytes / 1024,
            p.first().copied().unwrap_or(f64::NAN),
            p.last().copied().unwrap_or(f64::NAN),
            r.steady_bytes_per_s
        ));
    }
    out.push_str(&format!("\nSteady phase {} s per size.\n", steady.as_secs()));
    out
}
