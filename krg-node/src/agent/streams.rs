//! Streams, the agent's side: the cluster-wide loopback's port table.
//!
//! A TCP port bound by an SSI process to a loopback or wildcard address is
//! the cluster's, as on one machine: the *port home* (the lowest node id up,
//! like System V keys) records which node holds each port. A bind asks the
//! home to reserve the port; a connection to `127.0.0.1:P` asks where `P`
//! lives. Entries are not removed when the socket closes (no hook sees every
//! way a socket goes away: exit, exec, a child's copy): a reservation held
//! by another node is checked *when it matters*, by asking that node to
//! bind the port itself (`probe`). See docs/architecture/streams.md.

use super::{err, Agent, Caller};
use libkrg::proto::{ErrorReply, Response};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The port table (used at the home) and the ports this node holds.
#[derive(Debug, Default)]
pub struct Ports {
    /// At the home: port -> node that holds it. An async mutex: a
    /// reservation that conflicts probes the holder while holding it, so two
    /// binds of one port are decided one after the other.
    table: tokio::sync::Mutex<HashMap<u16, u32>>,
    /// Ports granted to this node (answers a local connection without
    /// asking the home; dropped when a probe finds the port free here).
    held: std::sync::Mutex<HashSet<u16>>,
}

/// A request to the port home.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum PortOp {
    /// Reserve `port` for `node`.
    Reserve { port: u16, node: u32, reuse: bool },
    /// Who holds `port`.
    Owner { port: u16 },
}

impl Ports {
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `port` is bound by anything on this node: try to bind it on the
/// wildcard address ourselves (dual-stack IPv6 first, which conflicts with
/// IPv4 and IPv6 binds alike; IPv4 when the node has no IPv6). `reuse` as
/// the socket that wants the port: with `SO_REUSEADDR` only listeners and
/// sockets bound without it conflict, as the kernel decides for that
/// socket.
pub(crate) fn in_use_here(port: u16, reuse: bool) -> bool {
    use socket2::{Domain, Socket, Type};
    let try_bind = |domain: Domain, addr: SocketAddr| -> Option<bool> {
        let s = Socket::new(domain, Type::STREAM, None).ok()?;
        if domain == Domain::IPV6 {
            s.set_only_v6(false).ok()?;
        }
        s.set_reuse_address(reuse).ok()?;
        match s.bind(&addr.into()) {
            Ok(()) => Some(false),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Some(true),
            Err(_) => None,
        }
    };
    try_bind(
        Domain::IPV6,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
    )
    .or_else(|| {
        try_bind(
            Domain::IPV4,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        )
    })
    // If neither family can even open a socket, say "in use": refusing a
    // bind is recoverable, two servers on one port are not.
    .unwrap_or(true)
}

impl Agent {
    /// This node, or another node that is up.
    fn alive(&self, node: u32) -> bool {
        node == self.node_id() || self.is_up(node)
    }

    fn port_home(&self) -> u32 {
        self.key_home()
    }

    /// This node's IPv4 address as the other nodes reach it.
    fn my_ipv4(&self) -> Option<[u8; 4]> {
        match self.cfg.advertise.ip() {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }

    fn node_ipv4(&self, node: u32) -> Option<[u8; 4]> {
        if node == self.node_id() {
            return self.my_ipv4();
        }
        match self.members().get(&node).map(|m| m.addr.ip()) {
            Some(IpAddr::V4(a)) => Some(a.octets()),
            _ => None,
        }
    }

    async fn port_call(self: &Arc<Self>, op: PortOp) -> Result<Option<u32>, ErrorReply> {
        let home = self.port_home();
        if home == self.node_id() {
            return self.port_home_op(op).await;
        }
        let c = self.client(home).await?;
        c.port_home(super::ctx(), op).await.map_err(|e| {
            self.drop_client(home);
            err(libc::EIO, format!("port home node {home}: {e}"))
        })?
    }

    /// At the home: serve a [`PortOp`]. `Reserve` answers `Ok(None)` when
    /// granted; `Owner` answers the holder, if any and up.
    pub(crate) async fn port_home_op(
        self: &Arc<Self>,
        op: PortOp,
    ) -> Result<Option<u32>, ErrorReply> {
        let mut t = self.ports.table.lock().await;
        match op {
            PortOp::Owner { port } => Ok(t.get(&port).copied().filter(|n| self.alive(*n))),
            PortOp::Reserve { port, node, reuse } => {
                if let Some(&holder) = t.get(&port) {
                    if holder != node
                        && self.alive(holder)
                        && self.probe_on(holder, port, reuse).await
                    {
                        return Err(err(
                            libc::EADDRINUSE,
                            format!("TCP port {port} is in use on node {holder}"),
                        ));
                    }
                }
                t.insert(port, node);
                Ok(None)
            }
        }
    }

    /// Whether `port` is in use on `node` (asked while deciding a
    /// reservation). An unreachable node holds nothing.
    async fn probe_on(self: &Arc<Self>, node: u32, port: u16, reuse: bool) -> bool {
        if node == self.node_id() {
            return self.port_probe(port, reuse).await;
        }
        let Ok(c) = self.client(node).await else {
            return false;
        };
        match c.port_probe(super::ctx(), port, reuse).await {
            Ok(b) => b,
            Err(e) => {
                self.drop_client(node);
                tracing::warn!("probing port {port} on node {node}: {e}");
                false
            }
        }
    }

    /// On the holder: is `port` still bound here? Forgets it if not.
    pub(crate) async fn port_probe(&self, port: u16, reuse: bool) -> bool {
        let used = tokio::task::spawn_blocking(move || in_use_here(port, reuse))
            .await
            .unwrap_or(true);
        if !used {
            self.ports.held().remove(&port);
        }
        used
    }

    // -- the application's requests ------------------------------------------

    pub(crate) async fn port_bind(
        self: &Arc<Self>,
        _who: Caller,
        port: u16,
        reuse: bool,
    ) -> Result<Response, ErrorReply> {
        let node = self.node_id();
        self.port_call(PortOp::Reserve { port, node, reuse })
            .await?;
        self.ports.held().insert(port);
        Ok(Response::Ok)
    }

    pub(crate) async fn port_owner(self: &Arc<Self>, port: u16) -> Result<Response, ErrorReply> {
        if self.ports.held().contains(&port) {
            return Ok(Response::PortOwner(None));
        }
        let owner = self.port_call(PortOp::Owner { port }).await?;
        Ok(Response::PortOwner(match owner {
            Some(n) if n != self.node_id() => self.node_ipv4(n).map(|a| (n, a)),
            _ => None,
        }))
    }

    pub(crate) fn node_addrs(&self) -> Response {
        let mut v: Vec<(u32, [u8; 4])> = self
            .members()
            .iter()
            .filter(|(_, m)| m.up())
            .filter_map(|(id, m)| match m.addr.ip() {
                IpAddr::V4(a) => Some((*id, a.octets())),
                IpAddr::V6(_) => None,
            })
            .collect();
        if let Some(a) = self.my_ipv4() {
            v.push((self.node_id(), a));
        }
        v.sort();
        Response::NodeAddrs(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_port_is_in_use_and_a_free_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(in_use_here(port, false));
        assert!(
            in_use_here(port, true),
            "a listener conflicts even with SO_REUSEADDR"
        );
        drop(l);
        assert!(!in_use_here(port, false));
    }
}
