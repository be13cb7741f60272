//! `cargo xtask bench`: what vmsniff costs per frame, measured by the kernel (bpf_stats:
//! run_time_ns / run_cnt of the tap program), on this machine's kernel.
//!
//! The scene is the privileged tests' hypervisor (a tap played by this process, bridged to a
//! peer) with copies going `--to-dev` a veth, so it needs no GRE. Configurations alternate
//! round by round, so that a change in the machine's load spreads over all of them.
use std::{fmt::Write as _, path::Path, process::Command, thread, time::Duration};

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

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds per configuration (the table shows their median, min and max).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Frames the VM sends per round and configuration.
    #[arg(long, default_value_t = 20_000)]
    frames: u32,
}

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

pub fn run(args: BenchArgs, workspace: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
    }
    if args.rounds == 0 || args.frames == 0 {
        bail!("--rounds and --frames must be at least 1");
    }
    crate::test::cargo(workspace, &["build", "-p", "vmsniff-user"])?;
    let vmsniff = workspace.join("target/debug/vmsniff");
    // Held for the whole run: the kernel counts run time only while a stats fd is open.
    let _stats =
        enable_stats(Stats::RunTime).context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;

    let mut hv = Hypervisor::new();
    hv.mirror_port();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..args.rounds {
        for (config, samples) in CONFIGS.iter().zip(&mut samples) {
            let ns_per_frame = measure(&mut hv, &vmsniff, config, args.frames)
                .with_context(|| format!("round {round}: {}", config.name))?;
            eprintln!("bench: round {} {:<42} {ns_per_frame:>7.1} ns/frame", round + 1, config.name);
            samples.push(ns_per_frame);
        }
    }
    let report = report(&args, &samples)?;
    print!("{report}");
    std::fs::write(workspace.join("BENCHMARKS.md"), &report).context("writing BENCHMARKS.md")?;
    eprintln!("bench: written to BENCHMARKS.md");
    Ok(())
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

fn report(args: &BenchArgs, samples: &[Vec<f64>]) -> anyhow::Result<String> {
    let uname = |flag: &str| -> String {
        Command::new("uname")
            .arg(flag)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let date = Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output()?;
    let mut out = String::new();
    writeln!(out, "# vmsniff benchmarks\n")?;
    writeln!(
        out,
        "Regenerated by `cargo xtask bench` (as root). Machine: {cpu}, {} CPUs; kernel {} {}; {}.\n",
        thread::available_parallelism().map_or(0, |n| n.get()),
        uname("-s"),
        uname("-r"),
        String::from_utf8_lossy(&date.stdout).trim()
    )?;
    writeln!(out, "## Cost per frame of the tap program, by filter\n")?;
    writeln!(
        out,
        "The kernel's own accounting (bpf_stats: run_time_ns / run_cnt of `vmsniff_tap_ingress`) over \
         {} frames of 128 bytes the VM sends, per round; median of {} alternating rounds, with min and \
         max. One session copying to a local veth (`--to-dev`): the copy's cost (bpf_clone_redirect \
         and the veth's transmit) is inside the program's run time, a filtered-out frame has none. \
         The filters are libpcap's programs run by vmsniff's classic BPF interpreter; the 10-term \
         filter is nine `host` terms then `udp port 9`, so a frame it drops runs all ten.\n",
        args.frames, args.rounds
    )?;
    writeln!(out, "| Configuration | median ns/frame | min | max |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (config, samples) in CONFIGS.iter().zip(samples) {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} |",
            config.name,
            sorted[sorted.len() / 2],
            sorted[0],
            sorted[sorted.len() - 1]
        )?;
    }
    writeln!(
        out,
        "\nTarget: a filtered-out frame costs under 50 ns on this machine. The first row is the floor: \
         a run that only finds the tap and a session with nothing to do for this direction, with the \
         kernel's own timing of the run included; what a filter adds is its row minus that one."
    )?;
    Ok(out)
}
