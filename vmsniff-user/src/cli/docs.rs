//! Man pages and shell completions, generated at run time from the one clap definition
//! ([`Cli`]), so that `vmsniff completions`, `vmsniff install` and the Debian package (built
//! from what `install` writes) always describe the binary they come with.
use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;

/// Section 8, system administration: vmsniff runs as root and Debian puts it in /usr/sbin.
pub const MAN_SECTION: &str = "8";

/// One rendered man page: `vmsniff.8`, `vmsniff-attach.8`, ...
pub struct ManPage {
    pub file_name: String,
    pub roff: Vec<u8>,
}

/// `vmsniff` and each subcommand, each on its own page.
pub fn man_pages() -> anyhow::Result<Vec<ManPage>> {
    // Without help's own subcommand: `vmsniff help` needs no page of its own.
    let mut cli = Cli::command().disable_help_subcommand(true);
    // Building names each subcommand `vmsniff-NAME`, which becomes its page's title and file.
    cli.build();
    let mut pages = Vec::new();
    add_pages(&cli, &mut pages)?;
    Ok(pages)
}

fn add_pages(command: &clap::Command, pages: &mut Vec<ManPage>) -> anyhow::Result<()> {
    let man = clap_mangen::Man::new(command.clone())
        .section(MAN_SECTION)
        .manual("vmsniff manual")
        .source(format!("vmsniff {}", env!("CARGO_PKG_VERSION")));
    let mut roff = Vec::new();
    let file_name = man.get_filename();
    man.render(&mut roff).with_context(|| format!("rendering the man page {file_name}"))?;
    pages.push(ManPage { file_name, roff });
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        add_pages(sub, pages)?;
    }
    Ok(())
}

/// The completion script for `shell`.
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "vmsniff", &mut script);
    script
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_name = "SHELL")]
    pub shell: Shell,
}

/// `vmsniff completions SHELL`: prints the script, for `source <(vmsniff completions bash)` or a
/// file in the shell's completion directory.
pub fn print_completion(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&completion(args.shell)).and_then(|()| stdout.flush()).context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subcommands() -> Vec<String> {
        Cli::command().get_subcommands().map(|s| s.get_name().to_owned()).collect()
    }

    #[test]
    fn every_subcommand_has_a_man_page_and_the_main_page_names_them_all() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert!(names.contains(&"vmsniff.8"), "{names:?}");
        let main = String::from_utf8(pages.iter().find(|p| p.file_name == "vmsniff.8").unwrap().roff.clone())
            .unwrap();
        for sub in subcommands() {
            assert!(names.contains(&format!("vmsniff-{sub}.8").as_str()), "no page for {sub}: {names:?}");
            assert!(main.contains(&format!("vmsniff\\-{sub}(8)")), "vmsniff.8 does not name {sub}:\n{main}");
        }
        // One page per command at every depth (`vmsniff-fleet-mirror.8`), and the main page.
        fn count(command: &clap::Command) -> usize {
            command.get_subcommands().map(|s| 1 + count(s)).sum()
        }
        assert_eq!(names.len(), count(&Cli::command()) + 1, "{names:?}");
        let attach = pages.iter().find(|p| p.file_name == "vmsniff-attach.8").unwrap();
        let attach = String::from_utf8_lossy(&attach.roff);
        assert!(attach.contains(".TH vmsniff-attach 8 "), "{attach}");
        assert!(attach.contains("\\-\\-attach\\-mode"), "the options are described:\n{attach}");
    }

    #[test]
    fn completions_offer_every_subcommand_in_each_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion(shell)).unwrap();
            for sub in subcommands() {
                // How each shell's script offers a subcommand after `vmsniff`.
                let offer = match shell {
                    Shell::Bash => format!("vmsniff,{sub})"),
                    Shell::Zsh => format!("'{sub}:"),
                    _ => format!("-f -a \"{sub}\""),
                };
                assert!(script.contains(&offer), "{shell}: {sub} is not offered ({offer})");
            }
            assert!(script.contains("attach-mode"), "{shell}: options are completed too");
        }
    }
}
