//! `vmsniff daemon` and `vmsniff reload`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::sync::watch;

use crate::{
    daemon::{
        self, config,
        state::{self, DaemonState, SessionState},
    },
    metrics,
    model::{listen::parse_listen_addr, sources::Sources},
};

/// Where the daemon keeps its state file and lock; shared by daemon, reload and status.
#[derive(Args, Debug, Clone)]
pub struct RunDirArg {
    /// The daemon's runtime directory (state file, lock).
    #[arg(long, value_name = "DIR", env = "VMSNIFF_RUN_DIR", default_value = state::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The mirrors to keep: TOML, one [session.NAME] table each, keys spelled like attach's
    /// flags (see the example in packaging/mirrors.toml).
    #[arg(long, value_name = "FILE", default_value = "/etc/vmsniff/mirrors.toml")]
    pub config: PathBuf,

    /// Check the config, print what it holds and exit (0 when it is valid).
    #[arg(long)]
    pub check: bool,

    #[command(flatten)]
    pub run_dir: RunDirArg,

    /// Serve Prometheus/OpenMetrics text on http://ADDR:PORT/metrics: every session's counters
    /// on this node (the daemon's and `vmsniff attach`'s), the daemon's session states. Wins
    /// over the config's `[daemon] metrics`.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen_addr)]
    pub metrics: Option<SocketAddr>,
}

pub async fn run(sources: Sources, args: DaemonArgs) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    if args.check {
        println!("{}: valid, {config}", args.config.display());
        for (name, spec) in &config.sessions {
            println!("  {name}: vmsniff attach {}", spec.spec.to_args().join(" "));
        }
        return Ok(());
    }
    let (published, watched) = watch::channel(DaemonState::default());
    // Listening comes first: a bad address or a port in use stops the start before anything
    // is attached or adopted.
    if let Some(addr) = args.metrics.or(config.metrics) {
        let listener = metrics::bind(addr).await?;
        log::info!("daemon: metrics on http://{addr}/metrics");
        tokio::spawn(metrics::serve(listener, metrics::hypervisor::scrape(sources.clone(), Some(watched))));
    }
    let options = daemon::Options { config: args.config, run_dir: args.run_dir.run_dir, published };
    daemon::run(sources, options).await
}

#[derive(Args, Debug)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub run_dir: RunDirArg,

    /// Seconds to wait for the daemon to finish the reload.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// Sends the daemon SIGHUP and waits until it has reloaded: exits non-zero, with the config's
/// error, when the daemon refused the new config.
pub async fn reload(args: ReloadArgs) -> anyhow::Result<()> {
    let dir = &args.run_dir.run_dir;
    let Some(before) =
        DaemonState::read(dir).with_context(|| format!("reading {}", state::state_path(dir).display()))?
    else {
        bail!(
            "no vmsniff daemon runs with run directory {} (start it: `systemctl start vmsniff`)",
            dir.display()
        );
    };
    if !before.daemon_running(dir) {
        bail!(
            "the vmsniff daemon (pid {}) is not running; start it (`systemctl start vmsniff`): it reads the config then",
            before.pid
        );
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(before.pid as i32), nix::sys::signal::Signal::SIGHUP)
        .with_context(|| format!("signalling the daemon (pid {})", before.pid))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = DaemonState::read(dir)?.unwrap_or_default();
        if now.pid == before.pid && now.reloads > before.reloads {
            if let Some(error) = now.reload_error {
                bail!("the daemon refused the new config and keeps the previous one: {error}");
            }
            let count = |s: SessionState| now.sessions.values().filter(|x| x.state == s).count();
            log::info!(
                "reloaded {}: {} session(s): {} active, {} waiting for their VM, {} in error",
                now.config,
                now.sessions.len(),
                count(SessionState::Active),
                count(SessionState::WaitingForVm),
                count(SessionState::Error)
            );
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the daemon (pid {}) did not finish the reload within {} s", before.pid, args.timeout);
        }
    }
}
