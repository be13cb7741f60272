//! What vmsniff's filters cost per frame, measured by the kernel (bpf_stats: run_time_ns /
//! run_cnt of the tap program), on this machine's kernel.
//!
//! The scene is the privileged tests' hypervisor (a real tap whose file descriptor this process
//! writes, bridged to a peer) with copies going `--to-dev` a veth, so it needs no GRE.
//! Configurations alternate round by round, so that a change in the machine's load spreads over
//! all of them.
use std::{fmt::Write as _, path::Path, thread, time::Duration};

use crate::demo::vmsniff_in;
use anyhow::{Context, bail};
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use vmsniff_tests::{
    frames::{self, L4, PEER_MAC, VM_MAC},
    netns::Netns,
    topology::{Hypervisor, MIRROR_DEV, TAP},
};

/// Frames the VM sends per round and configuration.
pub const FRAMES: u32 = 20_000;

/// A filter of ten terms whose match is the last one: a frame it drops runs all ten.
const TEN_TERMS: &str = "host 10.9.0.1 or host 10.9.0.2 or host 10.9.0.3 or host 10.9.0.4 or host 10.9.0.5 \
                         or host 10.9.0.6 or host 10.9.0.7 or host 10.9.0.8 or host 10.9.0.9 or udp port 9";

struct Config {
    name: &'static str,
    /// `--direction`: `in` leaves the measured hook (ingress, frames the VM sends) with nothing
    /// to do but find that out: the floor under every other row.
    direction: &'static str,
    filter: Option<&'static str>,
    /// Whether the VM's frames match the filter (UDP to port 9) or not (TCP to port 80).
    matching: bool,
}

const CONFIGS: [Config; 6] = [
    Config { name: "session for the other direction only", direction: "in", filter: None, matching: true },
    Config { name: "no filter (every frame copied)", direction: "out", filter: None, matching: true },
    Config {
        name: "1-term filter, frame matched and copied",
        direction: "out",
        filter: Some("udp port 9"),
        matching: true,
    },
    Config {
        name: "1-term filter, frame filtered out",
        direction: "out",
        filter: Some("udp port 9"),
        matching: false,
    },
    Config {
        name: "10-term filter, frame matched and copied",
        direction: "out",
        filter: Some(TEN_TERMS),
        matching: true,
    },
    Config {
        name: "10-term filter, frame filtered out",
        direction: "out",
        filter: Some(TEN_TERMS),
        matching: false,
    },
];

/// Every configuration, `rounds` times in alternation: ns per frame, by configuration.
pub fn run(rounds: usize, frames: u32, vmsniff: &Path) -> anyhow::Result<Vec<Vec<f64>>> {
    // Held for the whole run: the kernel counts run time only while a stats fd is open.
    let _stats =
        enable_stats(Stats::RunTime).context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
    let mut hv = Hypervisor::new();
    hv.mirror_port();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        for (config, samples) in CONFIGS.iter().zip(&mut samples) {
            super::check_interrupted()?;
            let ns_per_frame = measure(&mut hv, vmsniff, config, frames)
                .with_context(|| format!("round {round}: {}", config.name))?;
            eprintln!("bench: filters: round {} {:<42} {ns_per_frame:>7.1} ns/frame", round + 1, config.name);
            samples.push(ns_per_frame);
        }
    }
    Ok(samples)
}

/// One configuration, one round: attach, let the VM send, read the tap program's statistics.
fn measure(hv: &mut Hypervisor, vmsniff: &Path, config: &Config, count: u32) -> anyhow::Result<f64> {
    let mut attach = vec!["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--direction", config.direction];
    // Netlink, so that tc names the program's id on every kernel.
    attach.extend(["--attach-mode", "netlink"]);
    if let Some(filter) = config.filter {
        attach.extend(["--filter", filter]);
    }
    let id = vmsniff_in(&hv.ns, vmsniff, &attach)?;
    let result = (|| {
        let program = tap_ingress_program(&hv.ns)?;
        let before = stats(program)?;
        let l4 = if config.matching { L4::Udp(4000, 9) } else { L4::Tcp(4000, 80) };
        for seq in 0..count {
            hv.port.vm.send(&frames::ipv4(VM_MAC, PEER_MAC, [10, 0, 0, 2], [10, 0, 0, 1], l4, seq, 128));
        }
        thread::sleep(Duration::from_millis(200));
        let after = stats(program)?;
        let runs = after.1 - before.1;
        if runs < u64::from(count) {
            bail!("the tap program ran {runs} times for {count} frames");
        }
        Ok((after.0 - before.0) as f64 / runs as f64)
    })();
    vmsniff_in(&hv.ns, vmsniff, &["detach", id.trim()])?;
    result
}

/// The id of vmsniff's program on the tap's ingress hook, from tc.
fn tap_ingress_program(ns: &Netns) -> anyhow::Result<u32> {
    let filters = ns.sh(&format!("tc filter show dev {TAP} ingress"));
    let words: Vec<&str> = filters.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "id")
        .and_then(|w| w[1].parse().ok())
        .with_context(|| format!("no program id in tc's listing of {TAP}'s ingress: {filters}"))
}

/// (run time in ns, run count) of a loaded program.
fn stats(id: u32) -> anyhow::Result<(u64, u64)> {
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("BPF program {id} is not loaded")
}

/// The report's section.
pub fn section(out: &mut String, rounds: usize, frames: u32, samples: &[Vec<f64>]) -> anyhow::Result<()> {
    writeln!(out, "## Cost per frame of the tap program, by filter (this kernel)\n")?;
    writeln!(
        out,
        "The kernel's own accounting (bpf_stats: run_time_ns / run_cnt of `vmsniff_tap_ingress`) over \
         {frames} frames of 128 bytes the VM sends through a real tap, per round; median of {rounds} \
         alternating rounds, with min and max. One session copying to a local veth (`--to-dev`): the \
         copy's cost (bpf_clone_redirect and the veth's transmit) is inside the program's run time, a \
         filtered-out frame has none. The filters are libpcap's programs run by vmsniff's classic BPF \
         interpreter; the 10-term filter is nine `host` terms then `udp port 9`, so a frame it drops \
         runs all ten.\n"
    )?;
    writeln!(out, "| Configuration | median ns/frame | min | max |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (config, samples) in CONFIGS.iter().zip(samples) {
        let s = super::report::Stats::of(samples);
        writeln!(out, "| {} | {:.0} | {:.0} | {:.0} |", config.name, s.median, s.min, s.max)?;
    }
    writeln!(
        out,
        "\nTarget: a filtered-out frame costs under 50 ns on this machine. The first row is the floor: \
         a run that only finds the tap and a session with nothing to do for this direction, with the \
         kernel's own timing of the run included; what a filter adds is its row minus that one.\n"
    )?;
    Ok(())
}
