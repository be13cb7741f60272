//! Boots a kernel under QEMU, runs one command in it and reports how it ended.
//!
//! The guest sees the host's root read-only over 9p and a per-run directory under
//! `target/vm/runs/` read-write, mounted at the same path as on the host. The host writes the
//! guest's stage-two init, the command and a modprobe wrapper there; the guest writes the
//! command's exit status back. Nothing is left behind: the run directory goes when `RunDir` is
//! dropped, QEMU is killed when `Supervised` is dropped or when this process dies.
use std::{
    fs,
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal},
    unistd::Pid,
};

use super::{initramfs, kernels::Kernel};

/// Loaded at boot, so that every kernel starts from the same state whatever it would autoload
/// (kernels below 6.10 do not always autoload cls_bpf; ovs-vswitchd opens netfilter netlink
/// sockets without loading their modules first).
const PRELOAD: &[&str] = &[
    "ip_gre",
    "openvswitch",
    "vport-gre",
    "veth",
    "tun",
    "bridge",
    "8021q",
    "sch_ingress",
    "cls_bpf",
    "act_mirred",
    "sch_netem",
    "nfnetlink",
    "nf_conntrack_netlink",
    "nfnetlink_cttimeout",
];

/// Paths where the guest mounts a tmpfs: what lives there on the host is invisible inside.
pub const GUEST_TMPFS: &[&str] = &["/tmp", "/run", "/var/log"];

/// Stage two of the guest's init: PID 1 in the host's (read-only) root after switch_root.
/// `@RUN@`, `@PRELOAD@` are filled in per boot. Lines starting `vmsniff-vm: error:` tell the
/// host why the guest stopped without an exit status.
const STAGE_TWO: &str = r#"run=@RUN@
fail() {
    echo "vmsniff-vm: error: $*"
    /bin/busybox poweroff -f
}
export PATH="$run/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The root is read-only: HOME points at the guest's own scratch space.
export HOME=/tmp
for dir in /tmp /run /var/log; do
    mount -t tmpfs tmpfs "$dir" || fail "mounting a tmpfs on $dir"
done
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm \
    || fail "mounting /dev/pts and /dev/shm"
mount -t bpf bpf /sys/fs/bpf || fail "mounting bpffs on /sys/fs/bpf"
# Debugging aids only: a kernel without them still runs the command.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo "$run/bin/modprobe" > /proc/sys/kernel/modprobe || fail "setting kernel.modprobe"
modprobe -a @PRELOAD@ || fail "loading the preloaded modules"
ip link set lo up || fail "bringing lo up"
: > "$run/started" || fail "writing $run/started"
/bin/sh "$run/command.sh" </dev/null
echo $? > "$run/status"
/bin/busybox poweroff -f
"#;

/// The run's modprobe, for the kernel's autoloading and for commands: the guest kernel's modules
/// live in the harness's cache, not under the host's /lib/modules.
const MODPROBE: &str = "#!/bin/sh\nexec /sbin/modprobe -d @ROOT@ \"$@\"\n";

const PANIC: &str = "Kernel panic - not syncing";
const GUEST_ERROR: &str = "vmsniff-vm: error: ";

/// Why the guest stopped early, as its console told.
enum EarlyStop {
    /// Stage two's own error line.
    SetupFailed(String),
    /// The kernel's panic line.
    Panicked(String),
}

impl std::fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EarlyStop::SetupFailed(error) => write!(f, "guest setup failed: {error}"),
            EarlyStop::Panicked(line) => write!(f, "the guest kernel panicked: {line}"),
        }
    }
}

/// What the guest runs: argv resolved through the guest's PATH, in `cwd`, with `env` added.
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

pub enum Outcome {
    Exited(i32),
    TimedOut,
    Interrupted,
    /// The guest stopped without an exit status; the text says why, as far as the console told.
    Failed(String),
}

/// Boots `kernel`, runs `command` and streams the guest's console to stdout as it comes.
pub fn boot(
    kernel: &Kernel,
    run: &RunDir,
    command: &GuestCommand,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let dir = run.path();
    // The path goes on the kernel command line (split at blanks) and into a QEMU option (split
    // at commas).
    let dir_str = dir.to_str().filter(|s| !s.contains(|c: char| c.is_whitespace() || c == ','));
    let Some(dir_str) = dir_str else {
        bail!("the run directory {} must be a UTF-8 path without blanks or commas", dir.display());
    };
    let initrd = dir.join("initramfs.cpio");
    initramfs::build(kernel, &initrd)?;
    fs::create_dir(dir.join("bin")).context("creating the run's bin directory")?;
    let root = kernel.root.to_str().context("the kernel cache path is not UTF-8")?;
    write_script(&dir.join("bin/modprobe"), &MODPROBE.replace("@ROOT@", &quote(root)))?;
    write_script(
        &dir.join("init.sh"),
        &STAGE_TWO.replace("@RUN@", &quote(dir_str)).replace("@PRELOAD@", &PRELOAD.join(" ")),
    )?;
    write_script(&dir.join("command.sh"), &command_script(command))?;

    let deadline = Instant::now() + timeout;
    let mut boots = 0;
    loop {
        boots += 1;
        let (end, console) =
            run_qemu(kernel, dir_str, &initrd, deadline.saturating_duration_since(Instant::now()))?;
        // Under TCG a guest kernel has, rarely, panicked in an interrupt while it booted (seen once
        // in 6.12, at 1.5 s). Nothing of the command had run, so one more boot is a fair retry;
        // a panic once the command has started is always the run's result.
        let booting = !dir.join("started").exists();
        return Ok(match end {
            Ended::TimedOut => Outcome::TimedOut,
            Ended::Interrupted => Outcome::Interrupted,
            Ended::Exited => match fs::read_to_string(dir.join("status")) {
                Ok(status) => Outcome::Exited(
                    status
                        .trim()
                        .parse()
                        .with_context(|| format!("the guest wrote a bad exit status {status:?}"))?,
                ),
                Err(_) => match console {
                    Some(stop @ EarlyStop::Panicked(_)) if booting && boots == 1 => {
                        println!("vm: {stop}, before the command started: booting {} once more", kernel.name);
                        continue;
                    }
                    Some(stop) => Outcome::Failed(stop.to_string()),
                    None => Outcome::Failed(
                        "the guest stopped without reporting an exit status (see its console above)"
                            .to_owned(),
                    ),
                },
            },
        });
    }
}

/// One QEMU run of the prepared run directory; returns how it ended and what the console said of
/// an early stop.
fn run_qemu(
    kernel: &Kernel,
    dir_str: &str,
    initrd: &Path,
    timeout: Duration,
) -> anyhow::Result<(Ended, Option<EarlyStop>)> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        // qboot (package qemu-system-data) jumps straight to the kernel: SeaBIOS takes a second
        // under TCG and writes terminal escapes to the console.
        .args(["-bios", "qboot.rom"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots at once on a panic, and -no-reboot turns that into QEMU exiting.
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off vmsniff.run={dir_str}"))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!("local,path={dir_str},mount_tag=vmrun,security_model=none"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut qemu = Supervised::spawn(
        &mut qemu,
        "qemu-system-x86_64 (package qemu-system-x86: run `cargo xtask setup`)",
    )?;
    let console = qemu.child.stdout.take().context("QEMU's stdout")?;
    let reader = thread::spawn(move || forward_console(console));
    let end = qemu.wait(timeout)?;
    drop(qemu);
    let console = reader.join().map_err(|_| anyhow::anyhow!("the console reader panicked"))?;
    Ok((end, console))
}

/// Copies the guest's console to stdout without the serial line's carriage returns, and returns
/// the reason the guest gave for stopping early, or the kernel's panic line.
fn forward_console(mut console: impl std::io::Read) -> Option<EarlyStop> {
    let mut reason = None;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let mut stdout = std::io::stdout();
    while let Ok(n) = console.read(&mut buf) {
        if n == 0 {
            break;
        }
        let chunk: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
        // A closed stdout (a pager quit early) must not stop the guest: keep draining.
        let _ = stdout.write_all(&chunk).and_then(|()| stdout.flush());
        for byte in chunk {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(error) = text.split_once(GUEST_ERROR).map(|(_, e)| e) {
                reason = Some(EarlyStop::SetupFailed(error.to_owned()));
            } else if text.contains(PANIC) && reason.is_none() {
                reason = Some(EarlyStop::Panicked(text.trim().to_owned()));
            }
            line.clear();
        }
    }
    reason
}

/// `export`s, `cd` and `exec` of the command, every word single-quoted for the guest's sh.
fn command_script(command: &GuestCommand) -> String {
    let mut script = String::new();
    for (key, value) in &command.env {
        script.push_str(&format!("export {key}={}\n", quote(value)));
    }
    script.push_str(&format!("cd {} || exit 126\n", quote(&command.cwd.to_string_lossy())));
    script.push_str("exec");
    for arg in &command.argv {
        script.push(' ');
        script.push_str(&quote(arg));
    }
    script.push('\n');
    script
}

pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

pub fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// A per-boot directory under `target/vm/runs/`, removed on drop.
pub struct RunDir(PathBuf);

impl RunDir {
    /// Also removes the directories of earlier harness processes that no longer exist (killed
    /// with SIGKILL, so their drop never ran).
    pub fn create(vm_dir: &Path) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let runs = vm_dir.join("runs");
        fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
        for entry in fs::read_dir(&runs)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing stale {}", entry.path().display()))?;
            }
        }
        let path = runs.join(format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("vm: could not remove {}: {e}", self.0.display());
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP only set a flag: `Supervised::wait` then kills the child's
/// process group and returns, so the run directory is removed on the way out.
pub fn catch_interrupts() -> anyhow::Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }.with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

pub enum Ended {
    Exited,
    TimedOut,
    Interrupted,
}

/// A child in its own process group (so the terminal's Ctrl-C reaches only this process, which
/// then stops the child in order), killed with its whole group on drop and when this process
/// dies.
pub struct Supervised {
    pub child: Child,
}

impl Supervised {
    pub fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Self> {
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { child })
    }

    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<Ended> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait().context("waiting for a child process")?.is_some() {
                return Ok(Ended::Exited);
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(Ended::Interrupted);
            }
            if Instant::now() >= deadline {
                return Ok(Ended::TimedOut);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let group = Pid::from_raw(-(self.child.id() as i32));
        // ESRCH: the group is already gone, which is the normal end.
        let _ = signal::kill(group, Signal::SIGKILL);
        // ECHILD after a normal end: `wait` already reaped it.
        let _ = self.child.wait();
    }
}
