//! `vmsniff daemon --metrics`: every session of this node and network namespace as `status`
//! reads it (the kernel's counters, the devices' own, OVSDB's Mirror statistics), whoever made
//! it, and the daemon's config sessions' states. Rendered afresh at each scrape from a new
//! registry: a session that is gone leaves no series behind.
use std::{collections::BTreeMap, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use tokio::sync::watch;

use super::Scrape;
use crate::{
    daemon::state::{DaemonState, SessionState},
    model::{error::chain, sources::Sources},
    service::{
        Service,
        status::{SessionStatus, StatusReport},
    },
};

/// What names a session in every series of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub session: u32,
    /// The daemon's config session (`[session.NAME]`); empty for `vmsniff attach`'s.
    pub config: Option<String>,
    pub mode: &'static str,
    pub vm: Option<String>,
    pub nic: Option<u64>,
    pub tap: Option<String>,
    /// The collector's address; `dev:IFNAME` for a `--to-dev` session.
    pub collector: Option<String>,
    pub encap: &'static str,
    pub key: Option<u32>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    #[prometheus(flatten)]
    session: SessionLabels,
    /// `out` (frames the VM sends), `in`, or `both` (an OVS Mirror counts them together).
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    #[prometheus(flatten)]
    direction: DirectionLabels,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    #[prometheus(flatten)]
    direction: DirectionLabels,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    #[prometheus(flatten)]
    session: SessionLabels,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DaemonSessionLabels {
    config: String,
    mode: &'static str,
    state: &'static str,
}

/// The states `status` gives sessions of each mode; a state not listed (a later release's) is
/// still exported, as the one that is 1.
const EBPF_STATES: &[&str] = &["active", "tap-gone", "orphaned", "busy"];
const OVS_STATES: &[&str] = &["active", "mirror-gone", "output-gone", "vm-port-gone", "gre-error"];

/// The families, registered once per scrape and filled from one status read.
#[derive(Default)]
struct Families {
    copies: Family<DirectionLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    not_copied: Family<ReasonLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    truncated: Family<DirectionLabels, Counter>,
    tx_packets: Family<DeviceLabels, Counter>,
    tx_bytes: Family<DeviceLabels, Counter>,
    tx_errors: Family<DeviceLabels, Counter>,
    tx_dropped: Family<DeviceLabels, Counter>,
    state: Family<StateLabels, Gauge>,
    started: Family<SessionLabels, Gauge>,
    daemon_state: Family<DaemonSessionLabels, Gauge>,
    reloads: Counter,
    reload_refused: Gauge,
}

impl Families {
    fn register(&self, registry: &mut Registry, daemon: bool) {
        let r = registry;
        r.register(
            "vmsniff_copies",
            "Copies handed to the session's device (eBPF), or sent by its OVS Mirror",
            self.copies.clone(),
        );
        r.register(
            "vmsniff_copy_bytes",
            "Bytes of those frames as they were on the tap, before any --snaplen cut",
            self.bytes.clone(),
        );
        r.register("vmsniff_not_copied", "Frames not copied by choice: reason filtered (--filter), sampled-out (--sample), rate-limited (--rate-limit)", self.not_copied.clone());
        r.register("vmsniff_copy_failures", "Copies that failed at the source: reason clone-error (bpf_clone_redirect failed), snaplen-refused (too short to cut: dropped, never sent whole); one reason each", self.failures.clone());
        r.register("vmsniff_truncated", "Copies cut to --snaplen", self.truncated.clone());
        r.register(
            "vmsniff_device_tx_packets",
            "The session's tunnel device's own count of packets sent",
            self.tx_packets.clone(),
        );
        r.register(
            "vmsniff_device_tx_bytes",
            "The session's tunnel device's own count of bytes sent",
            self.tx_bytes.clone(),
        );
        r.register(
            "vmsniff_device_tx_errors",
            "The session's tunnel device's send errors (no route to the collector, ...)",
            self.tx_errors.clone(),
        );
        r.register(
            "vmsniff_device_tx_dropped",
            "Packets the session's tunnel device dropped",
            self.tx_dropped.clone(),
        );
        r.register(
            "vmsniff_session_state",
            "1 for the session's state as status shows it, 0 for the others",
            self.state.clone(),
        );
        r.register(
            "vmsniff_session_start_time_seconds",
            "When the session was made (a detach and attach starts its counters again from 0)",
            self.started.clone(),
        );
        if daemon {
            r.register(
                "vmsniff_daemon_session_state",
                "1 for each daemon config session's state (active, waiting-for-vm, error), 0 for the others",
                self.daemon_state.clone(),
            );
            r.register(
                "vmsniff_daemon_reloads",
                "Config reloads the daemon finished (SIGHUP, vmsniff reload)",
                self.reloads.clone(),
            );
            r.register(
                "vmsniff_daemon_reload_refused",
                "1 when the last reload was refused (the previous config stays in force)",
                self.reload_refused.clone(),
            );
        }
        super::register_build_info(r);
    }
}

/// The metrics text of `report`'s sessions and, for the daemon, its config sessions' states.
pub fn render(report: &StatusReport, daemon: Option<&DaemonState>) -> Result<String, String> {
    let families = Families::default();
    let mut registry = Registry::default();
    families.register(&mut registry, daemon.is_some());
    let config_names: BTreeMap<u32, String> = daemon
        .map(|d| d.sessions.iter().filter_map(|(name, s)| Some((s.session?, name.clone()))).collect())
        .unwrap_or_default();
    for s in &report.ebpf.sessions {
        ebpf_session(&families, s, config_names.get(&s.session).cloned());
    }
    for s in &report.ovs {
        let labels = SessionLabels {
            session: s.session,
            config: config_names.get(&s.session).cloned(),
            mode: s.mode,
            vm: s.vm.clone(),
            nic: s.nic.map(u64::from),
            tap: s.tap.clone(),
            collector: s.to.map(|ip| ip.to_string()),
            encap: s.encap,
            key: s.key,
        };
        let both = DirectionLabels { session: labels.clone(), direction: "both" };
        families.copies.get_or_create(&both).inc_by(s.ovs.tx_packets);
        families.bytes.get_or_create(&both).inc_by(s.ovs.tx_bytes);
        states(&families.state, &labels, OVS_STATES, s.state);
        families.started.get_or_create(&labels).set(seconds(s.created_at));
    }
    if let Some(daemon) = daemon {
        for (name, s) in &daemon.sessions {
            for state in SessionState::ALL {
                let labels = DaemonSessionLabels {
                    config: name.clone(),
                    mode: s.mode.as_str(),
                    state: state.as_str(),
                };
                families.daemon_state.get_or_create(&labels).set(i64::from(s.state == state));
            }
        }
        families.reloads.inc_by(daemon.reloads);
        families.reload_refused.set(i64::from(daemon.reload_error.is_some()));
    }
    super::encode(&registry)
}

fn ebpf_session(families: &Families, s: &SessionStatus, config: Option<String>) {
    let labels = SessionLabels {
        session: s.session,
        config,
        mode: s.mode,
        vm: s.vm.clone(),
        nic: s.nic.and_then(|n| u64::try_from(n).ok()),
        tap: Some(s.tap.clone()).filter(|t| !t.is_empty()),
        collector: s.to.map(|ip| ip.to_string()).or_else(|| s.to_dev.as_ref().map(|d| format!("dev:{d}"))),
        encap: s.encap,
        key: s.key,
    };
    let directions = [
        ("in", &s.counters.into_vm, &s.devices.into_vm),
        ("out", &s.counters.out_of_vm, &s.devices.out_of_vm),
    ];
    for (direction, c, device) in directions {
        if s.direction != "both" && s.direction != direction {
            continue;
        }
        let d = DirectionLabels { session: labels.clone(), direction };
        families.copies.get_or_create(&d).inc_by(c.frames);
        families.bytes.get_or_create(&d).inc_by(c.bytes);
        families.truncated.get_or_create(&d).inc_by(c.truncated);
        for (reason, n) in
            [("filtered", c.filtered), ("sampled-out", c.sampled_out), ("rate-limited", c.rate_limited)]
        {
            families.not_copied.get_or_create(&ReasonLabels { direction: d.clone(), reason }).inc_by(n);
        }
        // Each failed copy has one reason: the programs count a copy refused for its snaplen
        // as that alone, not as a clone error too.
        for (reason, n) in [("clone-error", c.clone_errors), ("snaplen-refused", c.snaplen_refused)] {
            families.failures.get_or_create(&ReasonLabels { direction: d.clone(), reason }).inc_by(n);
        }
        // A --to-dev interface is not the session's: its counters count everything it sends.
        if let (Some(device), Some(_)) = (device, s.to) {
            let l = DeviceLabels { direction: d.clone(), device: device.name.clone() };
            families.tx_packets.get_or_create(&l).inc_by(device.stats.tx_packets);
            families.tx_bytes.get_or_create(&l).inc_by(device.stats.tx_bytes);
            families.tx_errors.get_or_create(&l).inc_by(device.stats.tx_errors);
            families.tx_dropped.get_or_create(&l).inc_by(device.stats.tx_dropped);
        }
    }
    states(&families.state, &labels, EBPF_STATES, s.state);
    families.started.get_or_create(&labels).set(seconds(s.created_at));
}

/// One gauge per known state, 1 for `current`; `current` itself when it is not known.
fn states(
    family: &Family<StateLabels, Gauge>,
    labels: &SessionLabels,
    known: &[&'static str],
    current: &'static str,
) {
    let extra = (!known.contains(&current)).then_some(current);
    for state in known.iter().copied().chain(extra) {
        family
            .get_or_create(&StateLabels { session: labels.clone(), state })
            .set(i64::from(state == current));
    }
}

fn seconds(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// A scrape: `status` as the command reads it (the kernel, OVSDB, libvirt for VM names, under
/// the shared lock for the moment of reading), and the daemon's last recorded state.
pub fn scrape(sources: Sources, daemon: Option<watch::Receiver<DaemonState>>) -> Scrape {
    Arc::new(move || {
        let (sources, daemon) = (sources.clone(), daemon.clone());
        Box::pin(async move {
            let service = Service::open_for_reading(sources).map_err(|e| chain(&e))?;
            let report = service.status(None).await.map_err(|e| chain(e.as_ref()))?;
            let state = daemon.map(|d| d.borrow().clone());
            render(&report, state.as_ref())
        })
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        daemon::state::DaemonSession,
        model::mirror::Mode,
        observe::status::{Counters, DeviceStatus, PerDirection, Status},
        sys::netlink::LinkStats,
    };

    fn gre_session() -> SessionStatus {
        let counters = |frames| Counters {
            frames,
            bytes: frames * 100,
            clone_errors: 5,
            filtered: 5,
            sampled_out: 0,
            rate_limited: 2,
            truncated: 3,
            snaplen_refused: 4,
        };
        let device = |name: &str, tx_packets| DeviceStatus {
            name: name.into(),
            ifindex: 9,
            up: true,
            stats: LinkStats {
                tx_packets,
                tx_bytes: tx_packets * 130,
                tx_errors: 6,
                tx_dropped: 7,
                tx_carrier_errors: 0,
            },
            erspan: None,
            vxlan_port: None,
        };
        SessionStatus {
            session: 3,
            mode: "ebpf",
            tap: "tapf7eae624-34".into(),
            tap_ifindex: 4,
            vm: Some("c-private".into()),
            nic: Some(0),
            to: Some(Ipv4Addr::new(192, 0, 2, 2).into()),
            family: Some("ipv4"),
            to_dev: None,
            encap: "gre",
            erspan_hwid: None,
            port: None,
            key: Some(7),
            ttl: Some(64),
            tos: Some(0),
            direction: "both",
            filter: Some("not arp".into()),
            sample: 1,
            rate_limit: None,
            snaplen: Some(128),
            attach_mode: Some("tcx"),
            state: "active",
            owner_pid: None,
            created_at: 1_800_000_000,
            counters: PerDirection { into_vm: counters(10), out_of_vm: counters(20) },
            devices: PerDirection {
                into_vm: Some(device("vms3-in", 10)),
                out_of_vm: Some(device("vms3-out", 20)),
            },
        }
    }

    fn daemon_state() -> DaemonState {
        let mut state = DaemonState { reloads: 2, ..Default::default() };
        state.sessions.insert(
            "ids".into(),
            DaemonSession {
                state: SessionState::Active,
                mode: Mode::Ebpf,
                reason: None,
                session: Some(3),
                vm: Some("c-private".into()),
                tap: None,
                applied: None,
            },
        );
        state
    }

    #[test]
    fn each_counter_has_the_session_labels_and_its_direction() {
        let report =
            StatusReport { ebpf: Status { version: 1, sessions: vec![gre_session()] }, ovs: Vec::new() };
        let text = render(&report, Some(&daemon_state())).unwrap();
        let session = r#"session="3",config="ids",mode="ebpf",vm="c-private",nic="0",tap="tapf7eae624-34",collector="192.0.2.2",encap="gre",key="7""#;
        for line in [
            format!("vmsniff_copies_total{{{session},direction=\"out\"}} 20"),
            format!("vmsniff_copies_total{{{session},direction=\"in\"}} 10"),
            format!("vmsniff_copy_bytes_total{{{session},direction=\"out\"}} 2000"),
            format!("vmsniff_not_copied_total{{{session},direction=\"in\",reason=\"filtered\"}} 5"),
            format!("vmsniff_not_copied_total{{{session},direction=\"in\",reason=\"rate-limited\"}} 2"),
            format!("vmsniff_not_copied_total{{{session},direction=\"in\",reason=\"sampled-out\"}} 0"),
            format!("vmsniff_copy_failures_total{{{session},direction=\"out\",reason=\"clone-error\"}} 5"),
            format!(
                "vmsniff_copy_failures_total{{{session},direction=\"out\",reason=\"snaplen-refused\"}} 4"
            ),
            format!("vmsniff_truncated_total{{{session},direction=\"out\"}} 3"),
            format!("vmsniff_device_tx_packets_total{{{session},direction=\"out\",device=\"vms3-out\"}} 20"),
            format!("vmsniff_device_tx_errors_total{{{session},direction=\"in\",device=\"vms3-in\"}} 6"),
            format!("vmsniff_device_tx_dropped_total{{{session},direction=\"in\",device=\"vms3-in\"}} 7"),
            format!("vmsniff_session_state{{{session},state=\"active\"}} 1"),
            format!("vmsniff_session_state{{{session},state=\"tap-gone\"}} 0"),
            format!("vmsniff_session_start_time_seconds{{{session}}} 1800000000"),
            r#"vmsniff_daemon_session_state{config="ids",mode="ebpf",state="active"} 1"#.into(),
            r#"vmsniff_daemon_session_state{config="ids",mode="ebpf",state="waiting-for-vm"} 0"#.into(),
            "vmsniff_daemon_reloads_total 2".into(),
            "vmsniff_daemon_reload_refused 0".into(),
            "# TYPE vmsniff_copies counter".into(),
            "# TYPE vmsniff_session_state gauge".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_one_way_to_dev_session_has_no_device_series_and_no_other_direction() {
        let mut s = gre_session();
        (s.to, s.to_dev, s.encap, s.key, s.direction, s.state) =
            (None, Some("mir0".into()), "none", None, "out", "orphaned");
        let report = StatusReport { ebpf: Status { version: 1, sessions: vec![s] }, ovs: Vec::new() };
        let text = render(&report, None).unwrap();
        assert!(!text.contains("vmsniff_device_tx_packets_total{"), "{text}");
        assert!(!text.contains("direction=\"in\""), "{text}");
        assert!(!text.contains("vmsniff_daemon_"), "no daemon, no daemon series: {text}");
        let session = r#"session="3",config="",mode="ebpf",vm="c-private",nic="0",tap="tapf7eae624-34",collector="dev:mir0",encap="none",key="""#;
        let line = format!("vmsniff_session_state{{{session},state=\"orphaned\"}} 1");
        assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
    }

    #[test]
    fn a_state_no_list_knows_is_still_exported() {
        let family = Family::<StateLabels, Gauge>::default();
        let labels = SessionLabels {
            session: 1,
            config: None,
            mode: "ebpf",
            vm: None,
            nic: None,
            tap: None,
            collector: None,
            encap: "gre",
            key: Some(1),
        };
        states(&family, &labels, EBPF_STATES, "draining");
        assert_eq!(
            family.get(&StateLabels { session: labels.clone(), state: "draining" }).map(|g| g.get()),
            Some(1)
        );
        assert_eq!(family.get(&StateLabels { session: labels, state: "active" }).map(|g| g.get()), Some(0));
    }
}
