//! The five ways of mirroring the VM that the benchmark compares, each attached and detached
//! for real around every measurement.
use std::path::Path;

use anyhow::{Context as _, bail};
use aya::programs::loaded_programs;
use vmsniff_tests::netns::Netns;

use super::{
    relay::Relay,
    scene::{COLLECTOR_IP, Scene, TAP, TUNNEL_DEV, Tunnel},
};
use crate::demo::vmsniff_in;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Config {
    None,
    Vmsniff,
    /// vmsniff with its own VXLAN devices (`--encap vxlan`), beside its GRE: this kernel only.
    VmsniffVxlan,
    Mirred,
    Ovs,
    Relay,
}

pub const ALL: [Config; 6] =
    [Config::None, Config::Vmsniff, Config::VmsniffVxlan, Config::Mirred, Config::Ovs, Config::Relay];

impl Config {
    pub fn label(self) -> &'static str {
        match self {
            Config::None => "(a) no mirror",
            Config::Vmsniff => "(b) vmsniff (eBPF)",
            Config::VmsniffVxlan => "(b') vmsniff, --encap vxlan",
            Config::Mirred => "(c) tc mirred",
            Config::Ovs => "(d) OVS mirror",
            Config::Relay => "(e) AF_PACKET relay",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Vmsniff => "vmsniff",
            Config::VmsniffVxlan => "vmsniff-vxlan",
            Config::Mirred => "mirred",
            Config::Ovs => "ovs",
            Config::Relay => "relay",
        }
    }

    pub fn from_key(key: &str) -> Option<Config> {
        ALL.into_iter().find(|c| c.key() == key)
    }

    /// What the copies go through, for the report.
    pub fn how(self, tunnel: Tunnel) -> String {
        match (self, tunnel) {
            (Config::None, _) => "the VM's frames only".into(),
            (Config::Vmsniff, Tunnel::Vxlan) => format!("`vmsniff attach --tap {TAP} --to-dev {TUNNEL_DEV}`"),
            (Config::Vmsniff, Tunnel::Gre) => {
                format!("`vmsniff attach --tap {TAP} --to {COLLECTOR_IP}` (its own gretaps)")
            }
            (Config::VmsniffVxlan, _) => format!(
                "`vmsniff attach --tap {TAP} --to {COLLECTOR_IP} --encap vxlan` (its own vxlan devices, one per direction)"
            ),
            (Config::Mirred, _) => format!(
                "`tc filter add dev {TAP} ingress protocol all u32 match u32 0 0 action mirred egress mirror dev {TUNNEL_DEV}`, and the same on egress"
            ),
            (Config::Ovs, _) => {
                "a Mirror of the VM's port (select-src and select-dst) to a GRE port of br-int".into()
            }
            (Config::Relay, _) => format!("AF_PACKET on {TAP}, `send` of each frame into {TUNNEL_DEV}"),
        }
    }

    pub fn attach(self, scene: &Scene, vmsniff: &Path) -> anyhow::Result<Attached> {
        let hv = &scene.hv;
        Ok(match self {
            Config::None => Attached::Nothing,
            Config::Vmsniff => {
                // Netlink (clsact) on every kernel, so that tc names the programs' ids for their
                // statistics; the guest's 6.1 has no TCX anyway.
                let mut args = vec!["attach", "--tap", TAP, "--attach-mode", "netlink"];
                match scene.tunnel {
                    Tunnel::Vxlan => args.extend(["--to-dev", TUNNEL_DEV]),
                    Tunnel::Gre => args.extend(["--to", COLLECTOR_IP]),
                }
                let id = vmsniff_in(hv, vmsniff, &args)?.trim().to_owned();
                Attached::Vmsniff { id, programs: program_ids(hv)? }
            }
            Config::VmsniffVxlan => {
                let args = [
                    "attach",
                    "--tap",
                    TAP,
                    "--attach-mode",
                    "netlink",
                    "--to",
                    COLLECTOR_IP,
                    "--encap",
                    "vxlan",
                ];
                let id = vmsniff_in(hv, vmsniff, &args)?.trim().to_owned();
                Attached::Vmsniff { id, programs: program_ids(hv)? }
            }
            Config::Mirred => {
                hv.sh(&format!(
                    "tc qdisc add dev {TAP} clsact
                     tc filter add dev {TAP} ingress protocol all u32 match u32 0 0 action mirred egress mirror dev {TUNNEL_DEV}
                     tc filter add dev {TAP} egress protocol all u32 match u32 0 0 action mirred egress mirror dev {TUNNEL_DEV}"
                ));
                Attached::Mirred
            }
            Config::Ovs => {
                let ovs = scene.ovs.as_ref().context("the OVS mirror needs the OVS scene")?;
                // The GRE port and the Mirror in one transaction: a GRE port without its mirror
                // would be an ordinary port that floods into the tunnel.
                ovs.vsctl(&[
                    "--",
                    "--id=@gi",
                    "create",
                    "Interface",
                    "name=mirgre",
                    "type=gre",
                    &format!("options:remote_ip={COLLECTOR_IP}"),
                    "options:key=200",
                    "options:df_default=false",
                    "--",
                    "--id=@gp",
                    "create",
                    "Port",
                    "name=mirgre",
                    "interfaces=@gi",
                    "--",
                    "add",
                    "Bridge",
                    "br-int",
                    "ports",
                    "@gp",
                    "--",
                    "--id=@vm",
                    "get",
                    "Port",
                    TAP,
                    "--",
                    "--id=@m",
                    "create",
                    "Mirror",
                    "name=bench",
                    "select-src-port=@vm",
                    "select-dst-port=@vm",
                    "output-port=@gp",
                    "--",
                    "add",
                    "Bridge",
                    "br-int",
                    "mirrors",
                    "@m",
                ]);
                Attached::Ovs
            }
            Config::Relay => Attached::Relay(Relay::start(hv, TAP, TUNNEL_DEV)?),
        })
    }
}

/// A configuration in place. Whatever `detach` does not get to (a failed run) goes with the
/// namespaces.
pub enum Attached {
    Nothing,
    Vmsniff { id: String, programs: Vec<u32> },
    Mirred,
    Ovs,
    Relay(Relay),
}

impl Attached {
    /// CPU time (ns) that this configuration's user-space part has used so far: the relay's.
    pub fn user_ns(&self) -> anyhow::Result<u64> {
        match self {
            Attached::Relay(relay) => relay.user_ns(),
            _ => Ok(0),
        }
    }

    /// Run time (ns) and run count summed over vmsniff's programs, from bpf_stats.
    pub fn bpf_stats(&self) -> anyhow::Result<Option<(u64, u64)>> {
        let Attached::Vmsniff { programs, .. } = self else { return Ok(None) };
        let mut total = (0, 0);
        for info in loaded_programs() {
            let info = info.context("listing loaded BPF programs")?;
            if programs.contains(&info.id()) {
                total.0 += info.run_time().as_nanos() as u64;
                total.1 += info.run_count();
            }
        }
        Ok(Some(total))
    }

    pub fn detach(self, scene: &Scene, vmsniff: &Path) -> anyhow::Result<()> {
        match self {
            Attached::Nothing => {}
            Attached::Vmsniff { id, .. } => {
                vmsniff_in(&scene.hv, vmsniff, &["detach", &id])?;
            }
            Attached::Mirred => {
                scene.hv.sh(&format!("tc qdisc del dev {TAP} clsact"));
            }
            Attached::Ovs => {
                let ovs = scene.ovs.as_ref().context("the OVS mirror needs the OVS scene")?;
                ovs.vsctl(&[
                    "--", "--id=@m", "get", "Mirror", "bench", "--", "remove", "Bridge", "br-int", "mirrors",
                    "@m", "--", "del-port", "br-int", "mirgre",
                ]);
            }
            Attached::Relay(relay) => relay.stop()?,
        }
        Ok(())
    }
}

/// The ids of every BPF program attached through tc in `ns` (vmsniff's alone: nothing else in
/// the scene loads one), on any device and hook.
fn program_ids(ns: &Netns) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for dev in ns.link_names() {
        for hook in ["ingress", "egress"] {
            let (_, filters, _) = ns.try_sh(&format!("tc filter show dev {dev} {hook}"));
            let words: Vec<&str> = filters.split_whitespace().collect();
            ids.extend(words.windows(2).filter(|w| w[0] == "id").filter_map(|w| w[1].parse::<u32>().ok()));
        }
    }
    if ids.is_empty() {
        bail!("vmsniff attached, but tc shows no BPF program in the hypervisor's namespace");
    }
    Ok(ids)
}
