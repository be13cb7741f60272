//! Reaching etcd: endpoints, TLS and user the way `etcdctl` takes them (flags and `ETCDCTL_*`
//! environment), the fleet's key prefix, and a connection that is checked before it is used.
use std::{path::PathBuf, time::Duration};

use clap::Args;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use serde::Deserialize;
use thiserror::Error;

use crate::model::error::chain;

pub const DEFAULT_PREFIX: &str = "/vmsniff";
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2379";
/// How often a connection with an open stream (a watch, the lease's keep-alives) pings etcd;
/// one whose ping gets no answer within the timeout is dropped, and the watch starts again.
const PING_EVERY: Duration = Duration::from_secs(10);

/// `vmsniff fleet ...` and `collect --fleet`: etcdctl's flags and environment, except that
/// etcdctl's `--key` (the client key) is `--etcd-key` here: `--key` is a mirror's wire key.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd's endpoints, comma-separated, as etcdctl takes them (host:port, http:// or https://).
    #[arg(long, global = true, value_name = "URLS", env = "ETCDCTL_ENDPOINTS", value_delimiter = ',',
          default_value = DEFAULT_ENDPOINT)]
    pub endpoints: Vec<String>,

    /// The CA certificate (PEM) that signed etcd's server certificate: TLS to etcd.
    #[arg(long, global = true, value_name = "FILE", env = "ETCDCTL_CACERT")]
    pub cacert: Option<PathBuf>,

    /// This client's certificate (PEM), for etcd's client-certificate authentication.
    #[arg(long, global = true, value_name = "FILE", env = "ETCDCTL_CERT", requires = "etcd_key")]
    pub cert: Option<PathBuf>,

    /// The key (PEM) of --cert (etcdctl's --key).
    #[arg(long, global = true, value_name = "FILE", env = "ETCDCTL_KEY", requires = "cert")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user, `NAME` or `NAME:PASSWORD`.
    #[arg(long, global = true, value_name = "NAME[:PASSWORD]", env = "ETCDCTL_USER")]
    pub user: Option<String>,

    /// The password of --user, when it does not carry one.
    #[arg(long, global = true, value_name = "PASSWORD", env = "ETCDCTL_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// The fleet's key prefix in etcd: several fleets can share one etcd.
    #[arg(long, global = true, value_name = "PREFIX", env = "VMSNIFF_FLEET_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// Seconds to wait for etcd to answer before giving up.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub dial_timeout: u64,
}

impl EtcdArgs {
    pub fn settings(&self) -> EtcdSettings {
        EtcdSettings {
            endpoints: self.endpoints.clone(),
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.etcd_key.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            prefix: self.prefix.clone(),
            timeout: Duration::from_secs(self.dial_timeout),
        }
    }
}

/// How to reach the fleet's etcd, from the flags or from a daemon's `[fleet]` table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EtcdSettings {
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_timeout", rename = "dial-timeout-seconds", deserialize_with = "seconds")]
    pub timeout: Duration,
}

fn default_endpoints() -> Vec<String> {
    vec![DEFAULT_ENDPOINT.to_owned()]
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = u64::deserialize(d)?;
    if !(1..=300).contains(&s) {
        return Err(serde::de::Error::custom("dial-timeout-seconds must be 1 to 300"));
    }
    Ok(Duration::from_secs(s))
}

#[derive(Debug, Error)]
pub enum EtcdError {
    #[error("{0}")]
    Settings(String),
    #[error("cannot read {what} {}: give a readable PEM file", path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach etcd at {endpoints} ({reason}): is etcd running there? Give its endpoints with \
         --endpoints or ETCDCTL_ENDPOINTS"
    )]
    Unreachable { endpoints: String, reason: String },
    #[error(
        "the TLS connection to etcd at {endpoints} failed ({reason}): check --cacert (the CA of etcd's \
         certificate), --cert and --etcd-key (ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY)"
    )]
    Tls { endpoints: String, reason: String },
    #[error("etcd at {endpoints} refused the user or password ({reason}): check --user and --password")]
    Auth { endpoints: String, reason: String },
    #[error("etcd did not answer within {} s ({what}): is it overloaded or partitioned?", timeout.as_secs())]
    Timeout { what: String, timeout: Duration },
    #[error("etcd: {what} failed: {reason}")]
    Call { what: String, reason: String },
}

impl EtcdSettings {
    /// The fleet's etcd client, once etcd has answered a read under the prefix: a client that
    /// cannot read (down, wrong TLS, wrong password) fails here, before anything is written.
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let (endpoints, options) = self.prepared()?;
        let shown = self.endpoints.join(",");
        let probe = async {
            let mut client = Client::connect(&endpoints, Some(options)).await?;
            client
                .get(
                    self.prefix.as_bytes(),
                    Some(GetOptions::new().with_prefix().with_keys_only().with_limit(1)),
                )
                .await?;
            Ok::<Client, etcd_client::Error>(client)
        };
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), probe).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(self.classify(&shown, &e)),
            Err(_) => Err(EtcdError::Unreachable {
                endpoints: shown,
                reason: format!("no answer within {} s", self.timeout.as_secs()),
            }),
        }
    }

    /// What can be wrong before etcd is asked (the prefix, the endpoints, unreadable TLS
    /// files, a user without a password): a daemon's reload refuses such settings and keeps
    /// the connection it has.
    pub fn check(&self) -> Result<(), EtcdError> {
        self.prepared().map(drop)
    }

    /// The endpoints (with https:// where TLS is configured) and the connect options.
    fn prepared(&self) -> Result<(Vec<String>, ConnectOptions), EtcdError> {
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() > 128 {
            return Err(EtcdError::Settings(format!(
                "key prefix {:?}: give a path such as /vmsniff (a leading '/', none at the end, at most 128 bytes)",
                self.prefix
            )));
        }
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(EtcdError::Settings(
                "no etcd endpoint: give --endpoints host:port[,host:port...]".into(),
            ));
        }
        let tls = self.tls()?;
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| match (tls.is_some(), e.contains("://")) {
                (true, false) => format!("https://{e}"),
                _ => e.clone(),
            })
            .collect();
        // with_timeout is tonic's Endpoint::timeout: it bounds a call until etcd's response
        // headers (a unary answer, a stream's first message), never a stream's later quiet, so
        // the watch and the lease's keep-alive stream live on however long nothing happens
        // (tests/fleet.rs leaves a 1-s-timeout watch quiet for 3 s).
        // HTTP/2 pings while a stream is open: a connection that died without a word (etcd's
        // host gone, a firewall or NAT that forgot it) would otherwise hold a quiet watch for
        // ever, since nothing is sent on it. Not while idle, and not more often than etcd's
        // --grpc-keepalive-min-time (5 s by default) lets a client ping.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(PING_EVERY, self.timeout)
            .with_keep_alive_while_idle(false);
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        if let Some(user) = &self.user {
            let (name, password) = match (user.split_once(':'), &self.password) {
                (Some((name, password)), _) => (name.to_owned(), password.to_owned()),
                (None, Some(password)) => (user.clone(), password.clone()),
                (None, None) => {
                    return Err(EtcdError::Settings(format!(
                        "--user {user} has no password: give --user {user}:PASSWORD or --password"
                    )));
                }
            };
            options = options.with_user(name, password);
        }
        Ok((endpoints, options))
    }

    fn tls_configured(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some()
    }

    fn tls(&self) -> Result<Option<TlsOptions>, EtcdError> {
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| EtcdError::TlsFile { what, path: path.clone(), source })
        };
        if self.cacert.is_none() && self.cert.is_none() {
            return Ok(None);
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.cacert {
            tls = tls.ca_certificate(Certificate::from_pem(read("the CA certificate (--cacert)", ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("the client certificate (--cert)", cert)?,
                    read("the client key (--etcd-key)", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::Settings(
                    "a client certificate needs its key and the key its certificate: give both --cert and --etcd-key".into(),
                ));
            }
        }
        Ok(Some(tls))
    }

    fn classify(&self, endpoints: &str, e: &etcd_client::Error) -> EtcdError {
        // tonic's transport errors say little in Display: the whole error for RUST_LOG=debug.
        log::debug!("etcd at {endpoints}: {e:?}");
        let reason = match e {
            // Its Display is "transport error" twice over; the cause (a refused certificate,
            // a refused connection) is only in the Debug form.
            etcd_client::Error::TransportError(t) => format!("{t:?}"),
            _ => chain(e),
        };
        let lower = reason.to_lowercase();
        let endpoints = endpoints.to_owned();
        if lower.contains("authentication failed")
            || lower.contains("invalid auth token")
            || lower.contains("user name")
        {
            EtcdError::Auth { endpoints, reason }
        } else if lower.contains("certificate")
            || lower.contains("tls")
            || lower.contains("handshake")
            // With TLS 1.3 a refused client certificate shows after the handshake, often as
            // the connection closing (closed, reset, broken pipe) rather than as the server's
            // alert: with TLS, a connection made and then lost is put down to TLS.
            || (self.tls_configured() && !lower.contains("tcp connect") && !lower.contains("refused"))
        {
            EtcdError::Tls { endpoints, reason }
        } else {
            EtcdError::Unreachable { endpoints, reason }
        }
    }
}

/// Wraps an etcd call's error with what was being done.
pub fn call(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> EtcdError {
    let what = what.into();
    move |e| EtcdError::Call { what, reason: chain(&e) }
}
