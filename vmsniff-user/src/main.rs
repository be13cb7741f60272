//! vmsniff: mirror a VM's frames from the hypervisor to a remote collector.
use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;

use vmsniff_user::{
    chain,
    cli::{self, Cli, Command},
};

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let talks_to_etcd = match &cli.command {
        Command::Fleet(_) => true,
        Command::Collect(args) => args.fleet,
        _ => false,
    };
    if !matches!(cli.command, Command::Mirror(_) | Command::Daemon(_)) && !talks_to_etcd {
        // `vmsniff status | head` should end quietly, as other tools do, not panic on a closed
        // pipe. Not for `mirror` and `daemon`: they must live to detach their sessions. Not
        // for etcd's clients either: the gRPC stack writes with writev, which raises SIGPIPE
        // when etcd resets the connection (a refused client certificate), killing the
        // command before it can say why.
        // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            log::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sources = cli.sources();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Attach(args) => cli::attach::run(&sources, args).await,
            Command::Detach(args) => cli::detach::run(&sources, args).await,
            Command::Update(args) => cli::update::run(&sources, args).await,
            Command::Status(args) => cli::status::run(&sources, args).await,
            Command::Mirror(args) => cli::mirror::run(&sources, args).await,
            Command::List(args) => cli::list::run(&sources, args).await,
            Command::Show(args) => cli::show::run(&sources, args).await,
            Command::Capture(args) => cli::capture::run(&sources, args).await,
            Command::Collect(args) => cli::collect::run(args).await,
            Command::Fleet(args) => cli::fleet::run(args).await,
            Command::Daemon(args) => cli::daemon::run(sources, args).await,
            Command::Reload(args) => cli::daemon::reload(args).await,
            Command::Install(args) => cli::install::install(args),
            Command::Uninstall(args) => cli::install::uninstall(args),
            Command::Completions(args) => cli::docs::print_completion(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{}", chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Everything but a command's result goes to stderr, one line per event.
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let level = match record.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            writeln!(buf, "vmsniff: {level}{}", record.args())
        })
        .init();
}
