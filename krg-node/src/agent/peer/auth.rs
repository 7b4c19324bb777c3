//! Mutual authentication of two agents with the cluster key.
//!
//! Challenge-response with HMAC-SHA256 over both nonces and both node ids,
//! done on the raw TCP stream before it is handed to tarpc. A peer without
//! the key learns nothing and is refused; the refusal is logged by the
//! caller. The stream is not encrypted (see docs/architecture/agent.md).

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAGIC: &[u8; 4] = b"KRG1";
const TIMEOUT: Duration = Duration::from_secs(3);

type HmacSha256 = Hmac<Sha256>;

/// What one side proves: HMAC(key, role ‖ client id ‖ server id ‖ both
/// nonces), so a proof is bound to this exchange and this direction.
struct Transcript<'a> {
    role: &'a [u8],
    cid: u32,
    sid: u32,
    cn: &'a [u8; 32],
    sn: &'a [u8; 32],
}

impl Transcript<'_> {
    fn hmac(&self, key: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        m.update(self.role);
        m.update(&self.cid.to_le_bytes());
        m.update(&self.sid.to_le_bytes());
        m.update(self.cn);
        m.update(self.sn);
        m
    }

    fn proof(&self, key: &[u8]) -> [u8; 32] {
        self.hmac(key).finalize().into_bytes().into()
    }

    /// Constant-time check of the other side's proof.
    fn verify(&self, key: &[u8], tag: &[u8]) -> bool {
        self.hmac(key).verify_slice(tag).is_ok()
    }
}

/// The 40-byte opening of either side: magic, node id, nonce.
fn opening(id: u32, nonce: &[u8; 32]) -> [u8; 40] {
    let mut m = [0u8; 40];
    m[..4].copy_from_slice(MAGIC);
    m[4..8].copy_from_slice(&id.to_le_bytes());
    m[8..].copy_from_slice(nonce);
    m
}

/// Read the other side's opening: its node id and nonce.
async fn read_opening(s: &mut TcpStream, bad_magic: &'static str) -> io::Result<(u32, [u8; 32])> {
    let mut m = [0u8; 40];
    s.read_exact(&mut m).await?;
    if &m[..4] != MAGIC {
        return Err(refused(bad_magic));
    }
    let id = u32::from_le_bytes(m[4..8].try_into().expect("4 bytes"));
    Ok((id, m[8..].try_into().expect("32 bytes")))
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn refused(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.into())
}

/// Client side: prove we hold the key and check that the server does.
/// Returns the server's node id.
pub async fn client(s: &mut TcpStream, key: &[u8], my_id: u32) -> io::Result<u32> {
    tokio::time::timeout(TIMEOUT, client_inner(s, key, my_id))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "authentication timed out"))?
}

async fn client_inner(s: &mut TcpStream, key: &[u8], my_id: u32) -> io::Result<u32> {
    let cn = nonce();
    s.write_all(&opening(my_id, &cn)).await?;
    let (sid, sn) = read_opening(s, "peer does not speak the krg agent protocol").await?;
    let t = |role| Transcript {
        role,
        cid: my_id,
        sid,
        cn: &cn,
        sn: &sn,
    };
    // The client proves itself first, so a server never hands a proof to
    // someone who does not hold the key.
    s.write_all(&t(b"client").proof(key)).await?;
    let mut proof = [0u8; 32];
    s.read_exact(&mut proof).await.map_err(|_| {
        refused(format!(
            "node {sid} refused us (does it hold the same cluster key?)"
        ))
    })?;
    if !t(b"server").verify(key, &proof) {
        return Err(refused(format!(
            "node {sid} failed to prove the cluster key"
        )));
    }
    Ok(sid)
}

/// Server side: check the client's proof of the key. Returns its node id.
pub async fn server(s: &mut TcpStream, key: &[u8], my_id: u32) -> io::Result<u32> {
    tokio::time::timeout(TIMEOUT, server_inner(s, key, my_id))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "authentication timed out"))?
}

async fn server_inner(s: &mut TcpStream, key: &[u8], my_id: u32) -> io::Result<u32> {
    let (cid, cn) = read_opening(s, "not the krg agent protocol (bad magic)").await?;
    if cid == my_id {
        return Err(refused(format!("peer claims our own node id {cid}")));
    }
    let sn = nonce();
    s.write_all(&opening(my_id, &sn)).await?;
    let t = |role| Transcript {
        role,
        cid,
        sid: my_id,
        cn: &cn,
        sn: &sn,
    };
    let mut tag = [0u8; 32];
    s.read_exact(&mut tag).await?;
    if !t(b"client").verify(key, &tag) {
        return Err(refused(format!("node {cid} does not hold the cluster key")));
    }
    s.write_all(&t(b"server").proof(key)).await?;
    Ok(cid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair(ckey: &'static [u8], skey: &'static [u8]) -> (io::Result<u32>, io::Result<u32>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            server(&mut s, skey, 1).await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let cr = client(&mut c, ckey, 2).await;
        drop(c);
        (cr, srv.await.unwrap())
    }

    #[tokio::test]
    async fn same_key_is_accepted() {
        let (c, s) = pair(b"0123456789abcdef0123", b"0123456789abcdef0123").await;
        assert_eq!(c.unwrap(), 1);
        assert_eq!(s.unwrap(), 2);
    }

    #[tokio::test]
    async fn other_key_is_refused_both_ways() {
        let (c, s) = pair(b"0123456789abcdef0123", b"fedcba98765432100000").await;
        assert!(c.is_err());
        assert!(s.is_err() || c.is_err());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            server(&mut s, b"0123456789abcdef", 1).await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: example\r\nAccept: */*\r\nUser-Agent: x\r\n\r\n")
            .await
            .unwrap();
        let e = srv.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
