//! `vmsniff mirror`: attach, show live counters on one line, detach on Ctrl-C or SIGTERM.
use std::{
    collections::BTreeSet,
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::attach::AttachArgs;
use crate::{
    model::{error::chain, sources::Sources},
    service::{Keeper, Service, status::SessionStatus},
};

pub async fn run(sources: &Sources, args: AttachArgs) -> anyhow::Result<()> {
    args.require_ebpf("mirror")?;
    let spec = args.flags.spec()?;
    let mut signals = Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
        hangup: signal(SignalKind::hangup())?,
    };
    let service = Service::open(sources.clone())?;
    let attached = service.attach(&spec, &Keeper::Foreground).await?;
    let id = attached.id;
    log::info!("session {id}: mirroring {}", attached.what);
    println!("{id}");
    // Whatever ends the watch, an error included, the session is detached: it belongs to this
    // process and must not outlive it.
    let watched = watch(&service, id, &mut signals).await;
    match &watched {
        Ok(None) => {
            log::warn!("session {id} was detached by another command");
            return Ok(());
        }
        Ok(Some(ended_by)) => log::info!("{ended_by}: detaching session {id}"),
        Err(e) => log::error!("{}: detaching session {id}", chain(e.as_ref())),
    }
    service.detach_ebpf(&BTreeSet::from([id])).await?;
    watched.map(drop)
}

struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

/// Shows the live counters until a signal ends the mirror (`Some(signal)`) or the session is
/// gone (`None`).
async fn watch(service: &Service, id: u32, signals: &mut Signals) -> anyhow::Result<Option<&'static str>> {
    let live = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let ended_by = loop {
        tokio::select! {
            _ = signals.interrupt.recv() => break "interrupt",
            _ = signals.terminate.recv() => break "SIGTERM",
            _ = signals.hangup.recv() => break "SIGHUP",
            _ = ticker.tick() => {
                let Some(line) = counters_line(service, id).await? else { return Ok(None) };
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
    if let Some(line) = counters_line(service, id).await? {
        log::info!("{line}");
    }
    Ok(Some(ended_by))
}

async fn counters_line(service: &Service, id: u32) -> anyhow::Result<Option<String>> {
    let Some(s) = service.session_status(id).await? else { return Ok(None) };
    Ok(Some(line(id, &s)))
}

fn line(id: u32, s: &SessionStatus) -> String {
    let mut line = format!(
        "session {id} on {} [{}]: out {} frames {} bytes | in {} frames {} bytes | lost {}",
        s.tap,
        s.state,
        s.counters.out_of_vm.frames,
        s.counters.out_of_vm.bytes,
        s.counters.into_vm.frames,
        s.counters.into_vm.bytes,
        s.lost()
    );
    let (o, i) = (&s.counters.out_of_vm, &s.counters.into_vm);
    for (what, value, shown) in [
        ("filtered", o.filtered + i.filtered, s.filter.is_some()),
        ("sampled out", o.sampled_out + i.sampled_out, s.sample > 1),
        ("rate limited", o.rate_limited + i.rate_limited, s.rate_limit.is_some()),
        ("truncated", o.truncated + i.truncated, s.snaplen.is_some()),
        (
            "dropped, too short to cut",
            o.snaplen_refused + i.snaplen_refused,
            o.snaplen_refused + i.snaplen_refused > 0,
        ),
    ] {
        if shown {
            line.push_str(&format!(" | {what} {value}"));
        }
    }
    line
}
