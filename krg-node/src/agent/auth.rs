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

fn mac(key: &[u8], role: &[u8], cid: u32, sid: u32, cn: &[u8; 32], sn: &[u8; 32]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(role);
    m.update(&cid.to_le_bytes());
    m.update(&sid.to_le_bytes());
    m.update(cn);
    m.update(sn);
    m.finalize().into_bytes().into()
}

fn verify(
    key: &[u8],
    role: &[u8],
    cid: u32,
    sid: u32,
    cn: &[u8; 32],
    sn: &[u8; 32],
    tag: &[u8],
) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(role);
    m.update(&cid.to_le_bytes());
    m.update(&sid.to_le_bytes());
    m.update(cn);
    m.update(sn);
    // Constant-time comparison.
    m.verify_slice(tag).is_ok()
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
    let mut cn = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut cn);
    let mut hello = Vec::with_capacity(40);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&my_id.to_le_bytes());
    hello.extend_from_slice(&cn);
    s.write_all(&hello).await?;
    let mut challenge = [0u8; 40];
    s.read_exact(&mut challenge).await?;
    if &challenge[..4] != MAGIC {
        return Err(refused("peer does not speak the krg agent protocol"));
    }
    let sid = u32::from_le_bytes(challenge[4..8].try_into().expect("4 bytes"));
    let sn: [u8; 32] = challenge[8..40].try_into().expect("32 bytes");
    // The client proves itself first, so a server never hands a proof to
    // someone who does not hold the key.
    s.write_all(&mac(key, b"client", my_id, sid, &cn, &sn))
        .await?;
    let mut proof = [0u8; 32];
    s.read_exact(&mut proof).await.map_err(|_| {
        refused(format!(
            "node {sid} refused us (does it hold the same cluster key?)"
        ))
    })?;
    if !verify(key, b"server", my_id, sid, &cn, &sn, &proof) {
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
    let mut hello = [0u8; 40];
    s.read_exact(&mut hello).await?;
    if &hello[..4] != MAGIC {
        return Err(refused("not the krg agent protocol (bad magic)"));
    }
    let cid = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    let cn: [u8; 32] = hello[8..40].try_into().expect("32 bytes");
    if cid == my_id {
        return Err(refused(format!("peer claims our own node id {cid}")));
    }
    let mut sn = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut sn);
    let mut challenge = Vec::with_capacity(40);
    challenge.extend_from_slice(MAGIC);
    challenge.extend_from_slice(&my_id.to_le_bytes());
    challenge.extend_from_slice(&sn);
    s.write_all(&challenge).await?;
    let mut tag = [0u8; 32];
    s.read_exact(&mut tag).await?;
    if !verify(key, b"client", cid, my_id, &cn, &sn, &tag) {
        return Err(refused(format!("node {cid} does not hold the cluster key")));
    }
    s.write_all(&mac(key, b"server", cid, my_id, &cn, &sn))
        .await?;
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
