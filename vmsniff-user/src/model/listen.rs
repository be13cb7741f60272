//! `--metrics ADDR:PORT` and the daemon's `metrics` key: where an endpoint listens.
use std::net::SocketAddr;

/// An address and a port, IPv6 in brackets; the error says what is expected.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not ADDR:PORT; give an address and a port, such as 127.0.0.1:9466, \
             0.0.0.0:9466 or [::1]:9466"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_port_and_a_literal_address() {
        assert_eq!(parse_listen_addr("127.0.0.1:9466").unwrap().port(), 9466);
        assert!(parse_listen_addr("[::1]:9466").unwrap().is_ipv6());
        for bad in ["", "9466", "localhost:9466", "127.0.0.1", "127.0.0.1:99999", "::1:9466"] {
            assert!(parse_listen_addr(bad).unwrap_err().contains("such as 127.0.0.1:9466"), "{bad}");
        }
    }
}
