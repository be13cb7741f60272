//! A real etcd for the fleet's tests: Debian's `etcd-server` on 127.0.0.1 with its own data
//! directory and ports, stopped and removed on drop. Nodes live in network namespaces, whose
//! loopback is not the host's: [`Etcd::reach_from`] forwards the client port from a
//! namespace's 127.0.0.1 to the host's, so a node's daemon uses the same endpoint.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub struct Etcd {
    pub dir: PathBuf,
    /// With TLS: its CA, and a client certificate and key it accepts (PEM files in `dir`).
    pub tls: Option<TlsFiles>,
    pub client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    stop: Arc<AtomicBool>,
    /// Bytes relayed both ways for namespaces ([`Etcd::reach_from`]): their etcd traffic.
    relayed: Arc<AtomicU64>,
    /// Relayed connections made before the last [`Etcd::cut_connections`] (their number below
    /// this) carry nothing any more.
    cut: Arc<AtomicU64>,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certificates(dir: &std::path::Path) -> TlsFiles {
    let sh = |line: &str| {
        let out = Command::new("sh").arg("-ec").arg(line).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let quiet = "2>/dev/null";
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca {quiet}
         printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > san.ext
         printf 'extendedKeyUsage=clientAuth\n' > client.ext
         openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=etcd {quiet}
         openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile san.ext {quiet}
         openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=vmsniff {quiet}
         openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.ext {quiet}"
    ));
    TlsFiles {
        ca: dir.join("ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// A port free now on the host's loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts etcd and waits until it answers; `None` (with a printed reason) without etcd.
    pub fn start() -> Option<Etcd> {
        Etcd::start_with(false)
    }

    /// As [`Etcd::start`], serving TLS only and requiring a client certificate of its CA.
    pub fn start_tls() -> Option<Etcd> {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Etcd> {
        if !std::path::Path::new("/usr/bin/etcd").exists() {
            crate::skip("no /usr/bin/etcd: install Debian's etcd-server (`cargo xtask setup` does)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("vmsniff-etcd-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| make_certificates(&dir));
        let mut etcd = Etcd {
            tls,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            stop: Arc::new(AtomicBool::new(false)),
            relayed: Arc::new(AtomicU64::new(0)),
            cut: Arc::new(AtomicU64::new(0)),
        };
        etcd.resume();
        Some(etcd)
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Starts (again) on the same data and ports; returns once it answers.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd runs already");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let (client, peer) = (
            format!("{scheme}://127.0.0.1:{}", self.client_port),
            format!("http://127.0.0.1:{}", self.peer_port),
        );
        let pem = |file: &str| self.dir.join(file).to_string_lossy().into_owned();
        let tls_args: Vec<String> = match &self.tls {
            Some(_) => vec![
                "--cert-file".into(),
                pem("server.pem"),
                "--key-file".into(),
                pem("server.key"),
                "--trusted-ca-file".into(),
                pem("ca.pem"),
                "--client-cert-auth".into(),
            ],
            None => Vec::new(),
        };
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log")).unwrap();
        self.child = Some(
            Command::new("/usr/bin/etcd")
                .args(["--name", "test", "--data-dir"])
                .arg(self.dir.join("data"))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("test={peer}")])
                .args(&tls_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        // With TLS, a listening port is the sign (the JSON gateway needs a client certificate).
        let ready = || match self.tls {
            Some(_) => TcpStream::connect(("127.0.0.1", self.client_port)).is_ok(),
            None => self.revision_now().is_some(),
        };
        while !ready() {
            assert!(Instant::now() < deadline, "etcd did not answer within 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops etcd (SIGKILL: an outage, not a shutdown), keeping its data.
    pub fn pause(&mut self) {
        let mut child = self.child.take().expect("etcd runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// etcd's current revision: it moves with every write, so an unchanged revision proves
    /// that nothing was written.
    pub fn revision(&self) -> u64 {
        self.revision_now().expect("etcd answers")
    }

    /// Through etcd's JSON gateway (`/v3/kv/range`), with no client of our own.
    fn revision_now(&self) -> Option<u64> {
        let json = self.post("/v3/kv/range", r#"{"key":"AA=="}"#)?;
        let value: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
        value["header"]["revision"].as_str()?.parse().ok()
    }

    /// Every connection relayed so far goes silent for good, both ways, without closing: what a
    /// client sees when etcd's host is lost or a firewall or NAT forgets the connection.
    /// Connections made later are relayed as before.
    pub fn cut_connections(&self) {
        self.cut.fetch_add(1, Ordering::SeqCst);
    }

    /// Bytes relayed so far between namespaces and etcd.
    pub fn relayed_bytes(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// Writes `pairs` (key, value) straight through etcd's JSON gateway, 100 per transaction:
    /// a benchmark's thousands of records without a client process each.
    pub fn put_all(&self, pairs: &[(String, String)]) {
        for chunk in pairs.chunks(100) {
            let ops: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(k, v)| serde_json::json!({"requestPut": {"key": base64(k.as_bytes()), "value": base64(v.as_bytes())}}))
                .collect();
            let body = serde_json::json!({"success": ops}).to_string();
            let reply = self.post("/v3/kv/txn", &body).expect("etcd answers a transaction");
            assert!(reply.contains("\"succeeded\":true"), "etcd refused the transaction: {reply}");
        }
    }

    /// Turns on etcd's authentication with user `root` and `password` (etcd needs root first).
    pub fn enable_auth(&self, password: &str) {
        for (path, body) in [
            ("/v3/auth/user/add", serde_json::json!({"name": "root", "password": password})),
            ("/v3/auth/user/grant", serde_json::json!({"user": "root", "role": "root"})),
            ("/v3/auth/enable", serde_json::json!({})),
        ] {
            let reply = self.post(path, &body.to_string()).expect("etcd answers");
            assert!(!reply.contains("\"error\""), "{path}: {reply}");
        }
    }

    /// The watchers etcd serves now (its `etcd_debugging_mvcc_watcher_total` gauge): a client's
    /// watch counts once etcd has made it.
    pub fn watchers(&self) -> u64 {
        let metrics = (|| {
            let mut stream = TcpStream::connect(("127.0.0.1", self.client_port)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            write!(stream, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).ok()?;
            Some(reply)
        })()
        .expect("etcd serves /metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    fn post(&self, path: &str, body: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.client_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).ok()?;
        Some(reply.split("\r\n\r\n").nth(1)?.to_owned())
    }

    /// Makes etcd's endpoint work inside `ns` too: a listener on the namespace's 127.0.0.1 at
    /// the same port, each connection relayed to the host's etcd (refused while it is paused).
    pub fn reach_from(&self, ns: &Netns) {
        let port = self.client_port;
        let listener =
            ns.enter(move || TcpListener::bind(("127.0.0.1", port)).expect("listen in the namespace"));
        listener.set_nonblocking(true).unwrap();
        let (stop, relayed, cut) = (self.stop.clone(), self.relayed.clone(), self.cut.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        inside.set_nonblocking(false).unwrap();
                        match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(outside) => relay(inside, outside, &relayed, &cut),
                            Err(_) => drop(inside),
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
    }
}

/// Copies both ways until either side closes, counting the bytes.
fn relay(a: TcpStream, b: TcpStream, relayed: &Arc<AtomicU64>, cut: &Arc<AtomicU64>) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let born = cut.load(Ordering::SeqCst);
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        let (relayed, cut) = (relayed.clone(), cut.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if cut.load(Ordering::SeqCst) > born {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                relayed.fetch_add(n as u64, Ordering::Relaxed);
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        })
    };
    pipe(a, b2);
    pipe(b, a2);
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("etcd log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Standard base64, as etcd's JSON gateway takes keys and values.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
