//! One part of the benchmark (this kernel, or a guest kernel): every configuration, round by
//! round in alternation so that a change in the machine's load spreads over all of them.
use std::path::Path;

use anyhow::Context as _;
use aya::sys::{Stats, enable_stats};
use serde::{Deserialize, Serialize};

use super::{
    configs::{self, Config},
    scene::{Scene, Switch, Tunnel},
    traffic::{self, IperfServer, Trafgen},
};

/// How long and at which loads each configuration is measured.
pub struct Plan {
    pub rounds: usize,
    /// Seconds of each traffic run.
    pub secs: u64,
    /// Offered loads for the delivery ratio, as fractions of (a)'s highest frame rate (the
    /// unlimited run adds the last point).
    pub loads: &'static [f64],
}

/// What one part measured, as the report needs it (and as the guest sends it to the host).
#[derive(Serialize, Deserialize)]
pub struct Part {
    /// Where it ran: CPU, kernel, virtualisation.
    pub machine: String,
    pub kernel: String,
    pub tunnel: String,
    pub switch: String,
    pub secs: u64,
    /// (a)'s highest rate in the calibration runs before round 1, in frames/s.
    pub calibrated_pps: f64,
    pub loads: Vec<f64>,
    pub configs: Vec<ConfigSamples>,
}

#[derive(Serialize, Deserialize)]
pub struct ConfigSamples {
    pub config: String,
    pub how: String,
    pub rounds: Vec<Sample>,
}

/// One number of a sample, for tables and charts.
pub type Metric = fn(&Sample) -> f64;

/// One configuration in one round.
#[derive(Serialize, Deserialize, Clone)]
pub struct Sample {
    /// TCP bulk from the VM, at the receiver.
    pub tcp_gbps: f64,
    /// Small frames crossing the hypervisor per second when the VM sends as fast as it can.
    pub max_pps: f64,
    /// System CPU (all CPUs, plus the relay's user time) per frame the VM sent, at the lowest
    /// offered load.
    pub cpu_ns_per_frame: f64,
    /// bpf_stats: run time per run, summed over vmsniff's programs, per frame sent.
    pub bpf_ns_per_frame: Option<f64>,
    /// (offered frames/s, copies received / frames sent) at each load, the unlimited run last.
    pub delivery: Vec<(f64, f64)>,
}

pub fn run(plan: &Plan, switch: Switch, tunnel: Tunnel, vmsniff: &Path) -> anyhow::Result<Part> {
    // vmsniff's own VXLAN runs where the scene's tunnel is VXLAN (this kernel, beside the guest's
    // GRE rows), the OVS mirror where the switch is OVS.
    let configs: Vec<Config> = configs::ALL
        .into_iter()
        .filter(|c| *c != Config::Ovs || switch == Switch::Ovs)
        .filter(|c| *c != Config::VmsniffVxlan || tunnel == Tunnel::Vxlan)
        .collect();
    let scene = Scene::build(switch, tunnel)?;
    let _iperf = IperfServer::start(&scene.net)?;
    let trafgen = Trafgen::new()?;
    // Also warms up: the bridge or OVS learns both MACs, OVS installs its datapath flows.
    traffic::tcp_bulk(&scene, 1).context("the VM's first TCP run (is the scene forwarding?)")?;
    // The better of two runs: the first also warms up (under TCG, code is translated on first
    // use and runs much slower).
    let mut calibrated_pps: f64 = 0.0;
    for _ in 0..2 {
        let run = trafgen.run(&scene, None, plan.secs as f64).context("calibration run")?;
        calibrated_pps = calibrated_pps.max(run.delivered as f64 / run.secs);
    }
    progress(&format!(
        "{tunnel}/{}: (a) forwards {:.0} frames/s at most; loads {:?} of that",
        switch_name(switch),
        calibrated_pps,
        plan.loads
    ));
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 1..=plan.rounds {
        for (config, samples) in configs.iter().zip(&mut samples) {
            super::check_interrupted()?;
            let sample = measure(plan, &scene, &trafgen, *config, calibrated_pps, vmsniff)
                .with_context(|| format!("round {round}: {}", config.label()))?;
            progress(&format!(
                "round {round} {:<22} TCP {:6.3} Gbit/s, {:8.0} frames/s, {:6.0} ns CPU/frame{}, delivered {}",
                config.label(),
                sample.tcp_gbps,
                sample.max_pps,
                sample.cpu_ns_per_frame,
                sample.bpf_ns_per_frame.map(|n| format!(" ({n:.0} in BPF)")).unwrap_or_default(),
                sample.delivery.iter().map(|(_, r)| format!("{:.3}", r)).collect::<Vec<_>>().join("/"),
            ));
            samples.push(sample);
        }
    }
    Ok(Part {
        machine: super::report::machine(),
        kernel: super::report::kernel(),
        tunnel: tunnel.to_string(),
        switch: switch_name(switch).into(),
        secs: plan.secs,
        calibrated_pps,
        loads: plan.loads.to_vec(),
        configs: configs
            .iter()
            .zip(samples)
            .map(|(c, rounds)| ConfigSamples { config: c.key().into(), how: c.how(tunnel), rounds })
            .collect(),
    })
}

/// vmsniff's programs' own time per frame sent, from bpf_stats, in a run at the lowest load of
/// its own: the kernel counts run time only while a stats fd is open, and then every program
/// run pays two clock reads that no other configuration pays, so the throughput and CPU runs
/// are made with it closed. `None` for configurations without vmsniff.
fn bpf_run(
    plan: &Plan,
    scene: &Scene,
    trafgen: &Trafgen,
    attached: &configs::Attached,
    calibrated_pps: f64,
) -> anyhow::Result<Option<f64>> {
    if attached.bpf_stats()?.is_none() {
        return Ok(None);
    }
    let load = plan.loads.first().context("the plan has no offered load")?;
    let _stats =
        enable_stats(Stats::RunTime).context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
    let before = attached.bpf_stats()?;
    let run = trafgen.run(scene, Some((calibrated_pps * load) as u64), plan.secs as f64)?;
    let after = attached.bpf_stats()?;
    Ok(before.zip(after).map(|(b, a)| (a.0 - b.0) as f64 / run.sent.max(1) as f64))
}

fn switch_name(switch: Switch) -> &'static str {
    match switch {
        Switch::Bridge => "Linux bridge",
        Switch::Ovs => "Open vSwitch (kernel datapath)",
    }
}

fn progress(line: &str) {
    eprintln!("bench: {line}");
}

fn measure(
    plan: &Plan,
    scene: &Scene,
    trafgen: &Trafgen,
    config: Config,
    calibrated_pps: f64,
    vmsniff: &Path,
) -> anyhow::Result<Sample> {
    let attached = config.attach(scene, vmsniff)?;
    let result = (|| {
        let tcp_gbps = traffic::tcp_bulk(scene, plan.secs)?;
        let max = trafgen.run(scene, None, plan.secs as f64)?;
        // CPU per frame at the lowest load, where the CPUs are not saturated: at the highest
        // rate every configuration uses all the CPU there is, and CPU per frame would only
        // restate its throughput.
        let mut cpu = None;
        let mut delivery = Vec::new();
        for (i, load) in plan.loads.iter().enumerate() {
            let user_before = attached.user_ns()?;
            let run = trafgen.run(scene, Some((calibrated_pps * load) as u64), plan.secs as f64)?;
            if i == 0 {
                let user_after = attached.user_ns()?;
                cpu = Some((run.cpu_ns + user_after - user_before) as f64 / run.sent.max(1) as f64);
            }
            delivery.push((run.sent as f64 / run.secs, run.delivery_ratio()));
        }
        delivery.push((max.sent as f64 / max.secs, max.delivery_ratio()));
        let cpu_ns_per_frame = cpu.context("the plan has no offered load")?;
        let bpf_ns_per_frame = bpf_run(plan, scene, trafgen, &attached, calibrated_pps)?;
        Ok(Sample {
            tcp_gbps,
            max_pps: max.delivered as f64 / max.secs,
            cpu_ns_per_frame,
            bpf_ns_per_frame,
            delivery,
        })
    })();
    attached.detach(scene, vmsniff)?;
    result
}
