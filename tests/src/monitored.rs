//! Both ends of a mirror as an operator monitors them: `vmsniff daemon --metrics` in the
//! hypervisor's namespace, its sessions' copies crossing an underlay veth to `vmsniff collect
//! --metrics` in a collector namespace, and a real Prometheus there scraping both with the
//! README's scrape config (the hypervisor's target labelled with the address its copies leave
//! from). A tc rule on the hypervisor's uplink (egress, after the session's tunnel device has
//! sent the copy) can divert copies to a sink, as copies lost on the way; the sink counts what
//! it got. Not on the collector's ingress: collect reads through an AF_PACKET ring, which the
//! kernel feeds before tc's ingress hook. The promql test and `cargo xtask dashboard-picture`
//! share it.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    collect::Collector,
    daemon::{Daemon, session_state},
    netns::Netns,
    prometheus::Prometheus,
    run,
    topology::Hypervisor,
};

/// The hypervisor's underlay address: where its copies leave from, its scrape target's
/// `sender`, and where its daemon serves metrics.
pub const HV: &str = "10.243.0.1";
/// The collector's address, the sessions' `to`.
pub const COLLECTOR: &str = "10.243.0.2";
/// The collector's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// The running scene; on drop Prometheus, the collector and the daemon stop (sessions stay
/// for the caller's `detach --all`) and the capture file goes.
pub struct Monitored {
    // Dropped in this order: the processes before the namespace they run in.
    pub prometheus: Prometheus,
    pub collector: Collector,
    pub daemon: Daemon,
    pub col: Netns,
    /// The hypervisor's namespace, where the uplink and the sink are.
    hv: String,
    file: PathBuf,
}

impl Monitored {
    /// Links `hv` to a new collector namespace, starts the daemon with `sessions` (its
    /// `[session.NAME]` tables) and waits until `names` are active, then the collector (GRE,
    /// ERSPAN, and VXLAN on [`VXLAN_PORT`]) and Prometheus scraping both every `scrape_seconds`.
    pub fn start(hv: &Hypervisor, sessions: &str, names: &[&str], scrape_seconds: u64) -> Monitored {
        let col = Netns::new("mon");
        hv.ns.sh(&format!(
            "ip link add up1 type veth peer name down1 netns {ns}
             ip addr add {HV}/24 dev up1; ip link set up1 up",
            ns = col.name
        ));
        col.sh(&format!("ip addr add {COLLECTOR}/24 dev down1; ip link set down1 up"));
        // The sink: a veth pair whose far end has no address.
        hv.ns.sh("ip link add sink0 type veth peer name sink1
             ip link set sink0 up; ip link set sink1 up
             tc qdisc add dev up1 clsact");
        let daemon = Daemon::start(&hv.ns, &format!("[daemon]\nmetrics = \"{HV}:9466\"\n\n{sessions}"));
        for name in names {
            daemon.wait_for(&hv.ns, &format!("session {name} active"), |s| {
                session_state(s, name).0 == "active"
            });
        }
        let file = std::env::temp_dir().join(format!(
            "vmsniff-monitored-{}-{}.pcapng",
            std::process::id(),
            col.name
        ));
        let collector = Collector::start(
            &col,
            &[
                "-w",
                file.to_str().unwrap(),
                "--vxlan-port",
                &VXLAN_PORT.to_string(),
                "--metrics",
                "127.0.0.1:9467",
            ],
        );
        let prometheus = Prometheus::start(
            &col,
            &format!(
                "global: {{scrape_interval: {scrape_seconds}s}}\nscrape_configs:\n  - job_name: vmsniff\n    \
                 static_configs:\n      - targets: ['{HV}:9466']\n        labels: {{sender: '{HV}'}}\n  - \
                 job_name: vmsniff-collect\n    static_configs:\n      - targets: ['127.0.0.1:9467']\n"
            ),
        );
        Monitored { prometheus, collector, daemon, col, hv: hv.ns.name.clone(), file }
    }

    fn hv_sh(&self, line: &str) -> String {
        run("ip", &["netns", "exec", &self.hv, "sh", "-ec", line])
    }

    /// From now on, the hypervisor's uplink sends the packets `u32_match` selects (tc u32
    /// syntax, from the IP header) to the sink instead of the collector.
    pub fn divert(&self, prio: u32, u32_match: &str) {
        self.hv_sh(&format!(
            "tc filter add dev up1 egress prio {prio} protocol ip u32 {u32_match} action mirred egress \
             redirect dev sink0"
        ));
    }

    /// Every copy reaches the collector again.
    pub fn stop_diverting(&self) {
        self.hv_sh("tc filter del dev up1 egress");
    }

    /// Packets the sink received.
    pub fn diverted(&self) -> u64 {
        let json: Value = serde_json::from_str(&self.hv_sh("ip -j -s link show dev sink1")).unwrap();
        json[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    }

    /// Waits until the sink received `count` packets (none is still on its way), at most 10 s.
    pub fn wait_diverted(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.diverted() < count {
            assert!(Instant::now() < deadline, "{} packets at the sink, not {count}", self.diverted());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Monitored {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}
