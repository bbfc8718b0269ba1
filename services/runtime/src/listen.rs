//! Binding a tiny_http server that answers promptly.
//!
//! tiny_http writes answers through a 1 KiB buffer and does not set
//! `TCP_NODELAY`: the tail of any answer over 1 KiB then waits for the
//! client's delayed ACK (~40 ms; 23 requests/s with 4 KiB answers).
//! [`bind_nodelay`] sets it on the listening socket; Linux hands it down to
//! accepted sockets.

use std::net::SocketAddr;

/// The address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub struct BindError {
    /// The address asked for.
    pub addr: String,
    /// Why.
    pub reason: String,
}

/// Binds `listen` with `TCP_NODELAY` and wraps it in a tiny_http server;
/// returns the server and the bound address (`:0` gives an ephemeral port).
/// `service` prefixes the warning printed if the option cannot be set.
pub fn bind_nodelay(
    service: &str,
    listen: &str,
) -> Result<(tiny_http::Server, SocketAddr), BindError> {
    let bind = |reason: String| BindError {
        addr: listen.to_string(),
        reason,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(|e| bind(e.to_string()))?;
    if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        eprintln!("{service}: TCP_NODELAY not set ({e}): answers over 1 KiB will be slow");
    }
    let server =
        tiny_http::Server::from_listener(listener, None).map_err(|e| bind(e.to_string()))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| bind("not an IP address".into()))?;
    Ok((server, addr))
}
