//! `krg bench`, streams section: a TCP stream between two nodes reached at
//! `127.0.0.1` through krg's cluster-wide loopback, against the same
//! stream opened straight to the other node's address (what a program
//! does without krg), in the same run: throughput and round-trip latency.
//!
//! The worker `tcp` runs on node 1 under the library and starts its server
//! on node 2 with `KRG_NODE=2`. Both connections are ordinary TCP
//! connections between the two nodes: the ratio shows what the loopback
//! costs on the data path (nothing is expected: no relay, no hook on
//! read or write).

use super::{quantile, Sample};
use anyhow::{bail, Context, Result};
use libkrg::proto::{Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

const CHUNK: usize = 1 << 20;
const MSG: usize = 64;

/// The address of node `id` as this node's agent knows it.
fn node_ip(id: u32) -> Result<String> {
    match libkrg::client::call(&Request::Status)? {
        Response::Status(v) => v
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.address.rsplit_once(':').map(|(ip, _)| ip.to_string()))
            .with_context(|| format!("node {id} is not in the cluster")),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Rounds of each kind, interleaved (the machine is shared: one slow
/// moment must not decide a ratio).
const ROUNDS: usize = 5;

/// `krg-bench worker tcp MIB PINGS`. Values: MB/s and round-trip µs (p50,
/// p99) straight to node 2's address, then the same through 127.0.0.1;
/// medians over the rounds.
pub fn tcp_sample(mib: usize, pings: usize) -> Result<Vec<f64>> {
    let ip = node_ip(2)?;
    let mut rounds: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    let kinds = [("0.0.0.0", ip.as_str()), ("127.0.0.1", "127.0.0.1")];
    for round in 0..ROUNDS {
        // Alternate which goes first.
        for k in [round % 2, 1 - round % 2] {
            let (bind, connect) = kinds[k];
            rounds[k].push(one_round(bind, connect, mib, pings / ROUNDS)?);
        }
    }
    let mut out = Vec::new();
    for r in &rounds {
        for i in 0..3 {
            let mut v: Vec<f64> = r.iter().map(|x| x[i]).collect();
            out.push(quantile(&mut v, 0.5));
        }
    }
    Ok(out)
}

/// One throughput run and one latency run against a server bound to `bind`
/// on node 2, reached at `connect`: MB/s, round-trip p50 and p99 (µs).
fn one_round(bind: &str, connect: &str, mib: usize, pings: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    {
        let krg = std::env::current_exe()?;
        let mut server = Command::new(krg)
            .args(["worker", "tcp-serve", bind])
            .env("KRG_NODE", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the server on node 2")?;
        let mut port = String::new();
        BufReader::new(server.stdout.as_mut().context("server stdout")?).read_line(&mut port)?;
        let to = format!("{connect}:{}", port.trim());
        let conn = || {
            TcpStream::connect(&to)
                .with_context(|| format!("connecting to {to} (server on node 2)"))
        };
        // Throughput: MIB MiB one way, the server answers the byte count.
        let mut s = conn()?;
        s.write_all(b"T")?;
        let buf = vec![0x5au8; CHUNK];
        let t = Instant::now();
        for _ in 0..mib {
            s.write_all(&buf)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut got = [0u8; 8];
        s.read_exact(&mut got)?;
        let secs = t.elapsed().as_secs_f64();
        if u64::from_le_bytes(got) != (mib * CHUNK) as u64 {
            bail!(
                "the server received {} bytes of {}",
                u64::from_le_bytes(got),
                mib * CHUNK
            );
        }
        out.push((mib * CHUNK) as f64 / secs / 1e6);
        // Latency: 64-byte messages echoed.
        let mut s = conn()?;
        s.set_nodelay(true)?;
        s.write_all(b"P")?;
        let (msg, mut back) = ([7u8; MSG], [0u8; MSG]);
        let mut v = Vec::with_capacity(pings);
        for _ in 0..pings {
            let t = Instant::now();
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        drop(s);
        out.push(quantile(&mut v, 0.5));
        out.push(quantile(&mut v, 0.99));
        let st = server.wait()?;
        if !st.success() {
            bail!("the server on node 2 failed: {st}");
        }
    }
    Ok(out)
}

/// `krg-bench worker tcp-serve ADDR`: listen on ADDR (any port, printed),
/// serve one throughput connection then one echo connection.
pub fn tcp_serve(addr: &str) -> Result<Sample> {
    let l = TcpListener::bind((addr, 0)).with_context(|| format!("binding {addr}"))?;
    println!("{}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    for _ in 0..2 {
        let (mut c, _) = l.accept()?;
        let mut mode = [0u8; 1];
        c.read_exact(&mut mode)?;
        match mode[0] {
            b'T' => {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                loop {
                    let r = c.read(&mut buf)?;
                    if r == 0 {
                        break;
                    }
                    n += r as u64;
                }
                c.write_all(&n.to_le_bytes())?;
            }
            b'P' => {
                c.set_nodelay(true)?;
                let mut m = [0u8; MSG];
                while c.read_exact(&mut m).is_ok() {
                    c.write_all(&m)?;
                }
            }
            other => bail!("tcp-serve: unknown mode {other}"),
        }
    }
    Ok(Sample::default())
}

/// Print the section.
pub fn report(v: &[f64], mib: usize, pings: usize) {
    println!("TCP stream node 1 -> node 2 ({mib} MiB one way; {pings} round trips of {MSG} B)");
    println!(
        "  to node 2's address          {:8.0} MB/s   round trip {:6.1} us (p99 {:6.1})",
        v[0], v[1], v[2]
    );
    println!(
        "  to 127.0.0.1 (krg loopback)  {:8.0} MB/s   round trip {:6.1} us (p99 {:6.1})   {:.2}x throughput [goal >= 0.95], {:.2}x latency",
        v[3],
        v[4],
        v[5],
        v[3] / v[0],
        v[4] / v[1]
    );
}
