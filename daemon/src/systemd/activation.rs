//! Socket activation: the listening sockets systemd makes for `moat.socket` and passes to
//! moatd (`LISTEN_FDS`). Under the packaged unit moatd runs in a network namespace of its
//! own with no Internet socket family allowed (`PrivateNetwork=yes`,
//! `RestrictAddressFamilies=AF_UNIX`): these sockets are its only way in, and it has no way
//! out.

use std::net::{SocketAddr, TcpListener};

/// Why the passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket {index} systemd passed (LISTEN_FDS) is not a listening TCP socket: {source}")]
    NotTcp {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Listening sockets passed by systemd, not yet claimed by a configured listener.
#[derive(Debug, Default)]
pub struct Inherited {
    listeners: Vec<(SocketAddr, TcpListener)>,
    passed: bool,
}

impl Inherited {
    /// Takes the passed sockets. Run it before moatd starts any thread: it removes
    /// `LISTEN_FDS` and `LISTEN_PID` from the environment, so that nothing inherits them.
    pub fn from_env() -> Result<Self, ActivationError> {
        let mut fds = listenfd::ListenFd::from_env();
        let mut listeners = Vec::new();
        for index in 0..fds.len() {
            let not_tcp = |source| ActivationError::NotTcp { index, source };
            let Some(listener) = fds.take_tcp_listener(index).map_err(not_tcp)? else {
                continue;
            };
            let address = listener.local_addr().map_err(not_tcp)?;
            listeners.push((address, listener));
        }
        Ok(Self {
            passed: !listeners.is_empty(),
            listeners,
        })
    }

    /// Whether systemd passed any socket.
    pub fn passed(&self) -> bool {
        self.passed
    }

    /// The passed socket bound to exactly `address`, if any.
    pub fn take(&mut self, address: SocketAddr) -> Option<TcpListener> {
        let at = self
            .listeners
            .iter()
            .position(|(bound, _)| *bound == address)?;
        Some(self.listeners.swap_remove(at).1)
    }

    /// Passed sockets no configured listener claimed.
    pub fn unclaimed(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(address, _)| *address).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_claimed_by_its_exact_address_once() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
        let address = listener.local_addr().expect("address");
        let mut inherited = Inherited {
            listeners: vec![(address, listener)],
            passed: true,
        };
        let other = SocketAddr::from(([127, 0, 0, 1], address.port().wrapping_add(1)));
        assert!(inherited.take(other).is_none());
        assert_eq!(inherited.unclaimed(), [address]);
        assert!(inherited.take(address).is_some());
        assert!(inherited.take(address).is_none());
        assert!(inherited.unclaimed().is_empty());
        assert!(inherited.passed());
    }
}
