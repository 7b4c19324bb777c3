//! `krg bench`, shared memory section: remote page faults against a TCP
//! round trip between the same two nodes, a sequential read of a segment
//! populated on the other node, and one page bounced between two nodes.
//!
//! The workers run under the library: `dsm` on node 1 drives the run and
//! starts its partners on node 2 with `KRG_NODE=2` (remote exec).

use super::sys::Seg;
use super::{quantile, Sample};
use anyhow::{bail, Context, Result};
use libkrg::proto::{Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// Start `krg-bench worker ARGS` on node 2; its first line of output
/// says it is ready.
fn partner(args: &[&str]) -> Result<(Child, String)> {
    let krg = std::env::current_exe()?;
    let mut c = Command::new(krg)
        .arg("worker")
        .args(args)
        .env("KRG_NODE", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a partner on node 2")?;
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().context("partner stdout")?).read_line(&mut line)?;
    Ok((c, line.trim().to_string()))
}

fn finish(mut c: Child) -> Result<Sample> {
    let mut out = String::new();
    c.stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut out)?;
    let st = c.wait()?;
    if !st.success() {
        bail!("partner failed: {st}");
    }
    let line = out.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("partner output {out:?}"))
}

/// The address of node 2 as this node's agent knows it.
fn node2_ip() -> Result<String> {
    match libkrg::client::call(&Request::Status)? {
        Response::Status(v) => v
            .iter()
            .find(|n| n.id == 2)
            .and_then(|n| n.address.rsplit_once(':').map(|(ip, _)| ip.to_string()))
            .context("node 2 is not in the cluster"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Microseconds per round trip of 64 bytes out, 4 KiB back, to node 2.
fn tcp_floor(n: usize) -> Result<Vec<f64>> {
    let (child, port) = partner(&["dsm-echo", "0"])?;
    let s = TcpStream::connect(format!("{}:{port}", node2_ip()?))
        .with_context(|| format!("connecting to the echo server on node 2, port {port}"))?;
    let v = ping(s, n)?;
    finish(child)?;
    Ok(v)
}

/// The same round trip over loopback, to a server process on this node.
fn loopback_floor(n: usize) -> Result<Vec<f64>> {
    let krg = std::env::current_exe()?;
    let mut c = Command::new(krg)
        .args(["worker", "dsm-echo", "0"])
        .env("KRG_NODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut port = String::new();
    BufReader::new(c.stdout.as_mut().context("echo stdout")?).read_line(&mut port)?;
    let s = TcpStream::connect(format!("127.0.0.1:{}", port.trim()))?;
    let v = ping(s, n)?;
    finish(c)?;
    Ok(v)
}

fn ping(mut s: TcpStream, n: usize) -> Result<Vec<f64>> {
    s.set_nodelay(true)?;
    let (req, mut resp) = ([7u8; 64], vec![0u8; PAGE]);
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(v)
}

/// `krg-bench worker dsm PAGES SEQ_MIB`: every measurement of this section.
/// Values: read fault p50, p99; write fault p50, p99; TCP between the
/// nodes p50, p99; TCP over loopback p50, p99 (µs); sequential read MB/s
/// and the same read on the populating node; bounce operations per second.
pub fn dsm_sample(pages: usize, seq_mib: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    let key = 0x6b72_0000 | (std::process::id() as i32 & 0xffff);
    // Page faults: node 1 writes every page; node 2 reads them (read
    // faults); node 1 writes them again (taking them back); node 2 writes
    // them (write faults, the contents coming from node 1).
    let seg = Seg::create(key, (pages + 1) * PAGE)?;
    for i in 1..=pages {
        seg.touch(i, true);
    }
    let k = key.to_string();
    let mut r = finish(partner(&["dsm-touch", &k, "read"])?.0)?.values;
    for i in 1..=pages {
        seg.touch(i, true);
    }
    let mut w = finish(partner(&["dsm-touch", &k, "write"])?.0)?.values;
    seg.remove();
    let mut tcp = tcp_floor(pages)?;
    let mut lo = loopback_floor(pages)?;
    for v in [&mut r, &mut w, &mut tcp, &mut lo] {
        out.push(quantile(v, 0.5));
        out.push(quantile(v, 0.99));
    }

    // Sequential read of a segment populated here, from node 2; the floor
    // is the same read done here.
    let key = key ^ 0x10000;
    let seq = Seg::create(key, seq_mib << 20)?;
    for i in 0..seq.pages() {
        seq.touch(i, true);
    }
    let t = Instant::now();
    for i in 0..seq.pages() {
        seq.touch(i, false);
    }
    let local = (seq_mib << 20) as f64 / t.elapsed().as_secs_f64() / 1e6;
    let remote = finish(partner(&["dsm-seq", &key.to_string()])?.0)?.values[0];
    seq.remove();
    out.push(remote);
    out.push(local);

    // One contended page: an atomic add loop here and on node 2 for a
    // second.
    let key = key ^ 0x20000;
    let b = Seg::create(key, PAGE)?;
    b.counter().store(0, Ordering::SeqCst);
    let (child, _) = partner(&["dsm-bounce", &key.to_string(), "1000"])?;
    let t = Instant::now();
    let mut mine = 0u64;
    while t.elapsed() < Duration::from_millis(1000) {
        b.counter().fetch_add(1, Ordering::SeqCst);
        mine += 1;
    }
    let theirs = finish(child)?.values[0];
    let total = b.counter().load(Ordering::SeqCst);
    b.remove();
    if total != mine + theirs as u64 {
        bail!("bounced counter {total}, expected {mine} + {theirs}");
    }
    out.push(total as f64 / t.elapsed().as_secs_f64());
    Ok(out)
}

/// The partners (on node 2).
pub fn dsm_partner(what: &str, args: &[String]) -> Result<Sample> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .context("worker: missing argument")
    };
    let mut s = Sample::default();
    match what {
        "dsm-echo" => {
            let l = TcpListener::bind("0.0.0.0:0")?;
            println!("{}", l.local_addr()?.port());
            std::io::stdout().flush()?;
            let (mut c, _) = l.accept()?;
            c.set_nodelay(true)?;
            let (mut req, resp) = ([0u8; 64], vec![1u8; PAGE]);
            while c.read_exact(&mut req).is_ok() {
                c.write_all(&resp)?;
            }
        }
        "dsm-touch" => {
            println!("ready");
            let seg = Seg::attach(arg(1)?.parse()?)?;
            let write = arg(2)? == "write";
            // Downwards: each fault a single page (read ahead follows
            // upward runs only).
            for i in (1..seg.pages()).rev() {
                let t = Instant::now();
                seg.touch(i, write);
                s.values.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        "dsm-seq" => {
            println!("ready");
            let seg = Seg::attach(arg(1)?.parse()?)?;
            let t = Instant::now();
            for i in 0..seg.pages() {
                seg.touch(i, false);
            }
            s.values
                .push(seg.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        "dsm-bounce" => {
            println!("ready");
            let seg = Seg::attach(arg(1)?.parse()?)?;
            let ms: u64 = arg(2)?.parse()?;
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_millis(ms) {
                seg.counter().fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
            s.values.push(n as f64);
        }
        other => bail!("worker: unknown benchmark {other:?}"),
    }
    Ok(s)
}

/// Print the section (from `krg bench`, on the bench's 2-node cluster).
pub fn report(v: &[f64], pages: usize, seq_mib: usize) {
    println!(
        "shared memory across nodes (System V segment homed on node 1, faults taken on node 2; {pages} pages)"
    );
    let (floor, lo) = (v[4], v[6]);
    println!(
        "  read fault   {:7.1} us (p99 {:7.1})   {:.2}x node-to-node TCP, {:.2}x loopback TCP [goal <= 1.5x]",
        v[0],
        v[1],
        v[0] / floor,
        v[0] / lo
    );
    println!(
        "  write fault  {:7.1} us (p99 {:7.1})   {:.2}x node-to-node TCP, {:.2}x loopback TCP [goal <= 1.5x]",
        v[2],
        v[3],
        v[2] / floor,
        v[2] / lo
    );
    println!(
        "  TCP floor    {:7.1} us (p99 {:7.1})   64 B -> 4 KiB round trip, node 1 <-> node 2",
        v[4], v[5]
    );
    println!(
        "  loopback     {:7.1} us (p99 {:7.1})   the same on node 1 over 127.0.0.1",
        v[6], v[7]
    );
    println!(
        "  sequential read of {seq_mib} MiB populated on the other node {:7.0} MB/s   (one byte per page, as on the populating node: {:7.0} MB/s) [goal >= 500 MB/s]",
        v[8], v[9]
    );
    println!(
        "  one page bounced between two nodes (atomic add on both) {:9.0} ops/s",
        v[10]
    );
}
