//! A real Prometheus (Debian's `prometheus`), run by a test inside a namespace with its own data
//! directory and config, and queried over its HTTP API with curl.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::netns::Netns;

pub const BINARY: &str = "/usr/bin/prometheus";
const PORT: u16 = 9090;

/// A running Prometheus; killed and its directory removed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    ns: String,
}

impl Prometheus {
    /// Starts Prometheus in `ns` on 127.0.0.1:9090 with `config` (YAML) and waits until ready.
    pub fn start(ns: &Netns, config: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("vmsniff-prometheus-{}-{}", std::process::id(), ns.name));
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, BINARY])
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{PORT}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("prometheus log"))
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, dir, ns: ns.name.clone() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if prometheus.curl(&["http://127.0.0.1:9090/-/ready"]).0 {
                return prometheus;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus not ready within 20 s:\n{}", prometheus.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn curl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sf", "--max-time", "10"])
            .args(args)
            .output()
            .expect("curl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An instant query through /api/v1/query; panics with Prometheus's error unless it succeeds.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let form = format!("query={expr}");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "--max-time", "10", "--data-urlencode"])
            .arg(&form)
            .arg(format!("http://127.0.0.1:{PORT}/api/v1/query"))
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        let answer: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: not JSON from prometheus: {body}"));
        assert_eq!(answer["status"], "success", "query {expr}\nanswered {answer}");
        match answer["data"]["resultType"].as_str() {
            Some("vector") => answer["data"]["result"].as_array().expect("a vector").clone(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": answer["data"]["result"]})],
            other => panic!("query {expr}: result type {other:?}"),
        }
    }
}

impl Prometheus {
    /// A range query through /api/v1/query_range from `start` to `end` (Unix seconds) every
    /// `step` seconds: one element per series, `{"metric": {...}, "values": [[t, "v"], ...]}`.
    /// Panics with Prometheus's error unless it succeeds.
    pub fn query_range(&self, expr: &str, start: f64, end: f64, step: f64) -> Vec<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "--max-time", "30"])
            .args(["--data-urlencode", &format!("query={expr}")])
            .args(["--data-urlencode", &format!("start={start}")])
            .args(["--data-urlencode", &format!("end={end}")])
            .args(["--data-urlencode", &format!("step={step}")])
            .arg(format!("http://127.0.0.1:{PORT}/api/v1/query_range"))
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        let answer: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: not JSON from prometheus: {body}"));
        assert_eq!(answer["status"], "success", "query_range {expr}\nanswered {answer}");
        assert_eq!(answer["data"]["resultType"], "matrix", "query_range {expr}: {answer}");
        answer["data"]["result"].as_array().expect("a matrix").clone()
    }
}

/// The value of a vector element as Prometheus writes it, ["<time>", "<value>"].
pub fn value(element: &Value) -> f64 {
    element["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a value in {element}"))
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
