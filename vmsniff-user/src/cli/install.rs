//! `vmsniff install` / `vmsniff uninstall`: put this binary, the systemd unit, the example
//! config, the man pages and the shell completions on a compute node, and take exactly those
//! away again. The unit and the example are the ones in packaging/, built into the binary, and
//! the pages and completions are generated from its command line, so a copied binary is all a
//! node needs. `cargo xtask deb` builds the Debian package from what `install --root` writes.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Args;
use clap_complete::Shell;

use super::docs;

const UNIT: &str = include_str!("../../../packaging/systemd/vmsniff.service");
const EXAMPLE_CONFIG: &str = include_str!("../../../packaging/mirrors.toml");
/// Where the packaged unit expects the binary: Debian's place for a root daemon's tool.
const PACKAGED_BINARY: &str = "/usr/sbin/vmsniff";
const UNIT_PATH: &str = "etc/systemd/system/vmsniff.service";
const CONFIG_PATH: &str = "etc/vmsniff/mirrors.toml";

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Install under this directory instead of / (a package build, an image).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// Where the binary goes (inside --root); the unit is written to run it from there.
    #[arg(long, value_name = "DIR", default_value = "/usr/local/sbin")]
    pub bin_dir: PathBuf,

    /// Where the man pages (man/man8) and the bash, zsh and fish completions go (inside --root).
    #[arg(long, value_name = "DIR", default_value = "/usr/local/share")]
    pub share_dir: PathBuf,
}

struct Layout {
    binary: PathBuf,
    /// The binary's path as the running system sees it (without --root).
    binary_on_node: PathBuf,
    unit: PathBuf,
    config: PathBuf,
    man_dir: PathBuf,
    /// Each shell's completion file, where that shell looks under a share directory.
    completions: Vec<(Shell, PathBuf)>,
}

/// Where bash-completion, zsh and fish look for completions under a share directory (Debian's
/// zsh also reads /usr/local/share/zsh/site-functions; its package uses vendor-completions).
const COMPLETION_FILES: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions/vmsniff"),
    (Shell::Zsh, "zsh/site-functions/_vmsniff"),
    (Shell::Fish, "fish/vendor_completions.d/vmsniff.fish"),
];

impl Layout {
    fn new(args: &InstallArgs) -> anyhow::Result<Self> {
        for (flag, dir) in [("--bin-dir", &args.bin_dir), ("--share-dir", &args.share_dir)] {
            if !dir.is_absolute() {
                bail!("{flag} {} must be an absolute path (it is inside --root)", dir.display());
            }
        }
        let inside = |p: &Path| args.root.join(p.strip_prefix("/").unwrap_or(p));
        let binary_on_node = args.bin_dir.join("vmsniff");
        let share = inside(&args.share_dir);
        Ok(Self {
            binary: inside(&binary_on_node),
            binary_on_node,
            unit: args.root.join(UNIT_PATH),
            config: args.root.join(CONFIG_PATH),
            man_dir: share.join("man").join(format!("man{}", docs::MAN_SECTION)),
            completions: COMPLETION_FILES.iter().map(|(shell, path)| (*shell, share.join(path))).collect(),
        })
    }

    fn unit_text(&self) -> String {
        UNIT.replace(PACKAGED_BINARY, &self.binary_on_node.to_string_lossy())
    }
}

pub fn install(args: InstallArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args)?;
    let this = std::env::current_exe().context("finding this binary (/proc/self/exe)")?;
    if this != layout.binary {
        write_atomically(
            &layout.binary,
            &fs::read(&this).with_context(|| format!("reading {}", this.display()))?,
            0o755,
        )?;
        log::info!("installed {}", layout.binary.display());
    }
    write_atomically(&layout.unit, layout.unit_text().as_bytes(), 0o644)?;
    log::info!("installed {}", layout.unit.display());
    if layout.config.exists() {
        log::info!("kept the existing {}", layout.config.display());
    } else {
        write_atomically(&layout.config, EXAMPLE_CONFIG.as_bytes(), 0o644)?;
        log::info!("installed the example config {}", layout.config.display());
    }
    for page in docs::man_pages()? {
        write_atomically(&layout.man_dir.join(&page.file_name), &page.roff, 0o644)?;
    }
    log::info!("installed the man pages in {} (`man vmsniff`)", layout.man_dir.display());
    for (shell, path) in &layout.completions {
        write_atomically(path, &docs::completion(*shell), 0o644)?;
        log::info!("installed the {shell} completions {}", path.display());
    }
    if on_live_systemd(&args.root) {
        systemctl(&["daemon-reload"])?;
    }
    log::info!(
        "next: describe the mirrors in {} (`vmsniff daemon --check` checks it), then `systemctl enable --now vmsniff`",
        Path::new("/").join(CONFIG_PATH).display()
    );
    Ok(())
}

pub fn uninstall(args: InstallArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args)?;
    if on_live_systemd(&args.root) && layout.unit.exists() {
        // Stopping detaches the daemon's mirrors (unless its config keeps them on stop).
        systemctl(&["disable", "--now", "vmsniff.service"])?;
    }
    remove_if_present(&layout.unit)?;
    match fs::read_to_string(&layout.config) {
        Ok(text) if text == EXAMPLE_CONFIG => {
            remove_if_present(&layout.config)?;
            if let Some(dir) = layout.config.parent() {
                // Only when empty: anything else in it is the operator's.
                let _ = fs::remove_dir(dir);
            }
        }
        Ok(_) => {
            log::warn!("kept {}: it is not the example any more; remove it by hand", layout.config.display())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", layout.config.display())),
    }
    for page in docs::man_pages()? {
        remove_if_present(&layout.man_dir.join(&page.file_name))?;
    }
    for (_, path) in &layout.completions {
        remove_if_present(path)?;
    }
    remove_if_present(&layout.binary)?;
    if on_live_systemd(&args.root) {
        systemctl(&["daemon-reload"])?;
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("a path with a parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("vmsniff-new");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("moving {} to {}", tmp.display(), path.display()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            log::info!("removed {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Installing into the running system, and systemd runs it.
fn on_live_systemd(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("systemctl").args(args).status().context("running systemctl")?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_binary_where_it_was_put() {
        let args = InstallArgs {
            root: "/tmp/r".into(),
            bin_dir: "/opt/vmsniff/bin".into(),
            share_dir: "/opt/vmsniff/share".into(),
        };
        let layout = Layout::new(&args).unwrap();
        assert_eq!(layout.binary, Path::new("/tmp/r/opt/vmsniff/bin/vmsniff"));
        assert!(layout.unit_text().contains("ExecStart=/opt/vmsniff/bin/vmsniff daemon"));
        assert!(!layout.unit_text().contains(PACKAGED_BINARY));
        assert_eq!(layout.unit, Path::new("/tmp/r/etc/systemd/system/vmsniff.service"));
        assert_eq!(layout.man_dir, Path::new("/tmp/r/opt/vmsniff/share/man/man8"));
        assert!(
            layout
                .completions
                .iter()
                .any(|(_, p)| p == Path::new("/tmp/r/opt/vmsniff/share/zsh/site-functions/_vmsniff"))
        );
    }

    #[test]
    fn relative_directories_are_refused() {
        let args =
            InstallArgs { root: "/".into(), bin_dir: "/usr/local/sbin".into(), share_dir: "share".into() };
        let err = Layout::new(&args).err().unwrap().to_string();
        assert!(err.contains("--share-dir share must be an absolute path"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let config = crate::daemon::config::parse("mirrors.toml", EXAMPLE_CONFIG).unwrap();
        assert!(config.sessions.is_empty(), "the example's sessions are commented out");
        let uncommented: String = EXAMPLE_CONFIG
            .lines()
            .map(|l| l.strip_prefix('#').filter(|r| r.starts_with('[') || r.contains(" = ")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let config = crate::daemon::config::parse("mirrors.toml", &uncommented).unwrap();
        assert_eq!(config.sessions.len(), 3);
        assert!(config.sessions["span-c-web"].spec.is_ovs());
    }
}
