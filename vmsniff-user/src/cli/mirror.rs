//! `vmsniff mirror`: attach, show live counters on one line, detach on Ctrl-C or SIGTERM.
use std::{
    collections::BTreeSet,
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};

use super::attach::{AttachArgs, attach};
use crate::{apply::maps::PinnedMaps, observe::status, session::Namespace};

pub async fn run(args: AttachArgs) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let namespace = Namespace::open()?;
    let (id, _) = attach(&namespace, &args.mirror, Some(std::process::id())).await?;
    println!("{id}");
    let live = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let ended_by = loop {
        tokio::select! {
            _ = interrupt.recv() => break "interrupt",
            _ = terminate.recv() => break "SIGTERM",
            _ = hangup.recv() => break "SIGHUP",
            _ = ticker.tick() => {
                let Some(line) = counters_line(&namespace, id).await? else {
                    log::warn!("session {id} was detached by another command");
                    return Ok(());
                };
                if live {
                    eprint!("\r\x1b[2K{line}");
                    std::io::stderr().flush()?;
                }
            }
        }
    };
    if live {
        eprintln!();
    }
    if let Some(line) = counters_line(&namespace, id).await? {
        log::info!("{line}");
    }
    log::info!("{ended_by}: detaching session {id}");
    let _lock = namespace.lock()?;
    namespace.detach(&BTreeSet::from([id])).await?;
    Ok(())
}

async fn counters_line(namespace: &Namespace, id: u32) -> anyhow::Result<Option<String>> {
    let Some(maps) = PinnedMaps::open(&namespace.kernel.paths)? else { return Ok(None) };
    let observed = maps.observe()?;
    if !observed.sessions.contains_key(&id) {
        return Ok(None);
    }
    let status = status::read(&namespace.kernel.netlink, Some(&maps), &observed).await?;
    let Some(s) = status.sessions.iter().find(|s| s.session == id) else { return Ok(None) };
    Ok(Some(format!(
        "session {id} on {} [{}]: out {} frames {} bytes | in {} frames {} bytes | lost {}",
        s.tap,
        s.state,
        s.counters.out_of_vm.frames,
        s.counters.out_of_vm.bytes,
        s.counters.into_vm.frames,
        s.counters.into_vm.bytes,
        status::lost(s)
    )))
}
