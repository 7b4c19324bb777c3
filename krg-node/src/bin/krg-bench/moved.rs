//! `krg bench`, streams that moved: a TCP connection and a pipe measured
//! before and after migrating one end, and the time to migrate a process
//! holding 100 connections, all in one run.
//!
//! The worker (`krg-bench worker moved`, node 1, under the library) talks to a
//! *peer* process (`krg-bench worker stream-peer`), the end that moves:
//! - TCP: the peer starts on node 2 (`KRG_NODE=2`) and is reached at
//!   127.0.0.1; measured there, moved to node 1 (both ends on one node)
//!   and back to node 2, measured again: after/before on the same nodes.
//! - pipe: the peer is the worker's child on node 1, reading its stdin and
//!   answering on its stdout; measured (a plain pipe), moved to node 2 (the
//!   pipes become connections between the nodes), measured, moved back to
//!   node 1 (a pipe again), measured.
//! - After the moves, each moved stream is measured again interleaved with
//!   an *untouched* stream of the same kind between the same places (a
//!   fresh peer): on a shared, noisy machine two measurements minutes
//!   apart differ more than a moved stream from an unmoved one, so the
//!   goals compare streams measured in the same seconds.
//! - 100 connections: the time of `krg migrate` of a peer holding 100
//!   connections to the worker, against the same peer holding one.
//!
//! - The worker and every peer run on one CPU (`bench::pin_to`): on this
//!   VM where the kernel puts two ends of a pipe moves its throughput
//!   tenfold, more than anything a move could change.
//!
//! The protocol, both ways: an 8-byte length `n`, `n` bytes, and the peer
//! answers one byte once it has them all.
//!
//! Migrations are run by a `krg migrate` process: the worker is the peer's
//! peer, frozen and handed its new connections during each move, so it
//! must not be inside an agent call of its own then.

use super::{pin_to, quantile, sys, this_cpu, PIN_ENV};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const CHUNK: usize = 1 << 20;
const MSG: usize = 64;
/// Measurements per state (median taken): the machine is shared.
const REPEAT: usize = 3;

/// `krg-bench worker stream-peer pipe` | `stream-peer tcp N`: serve the protocol
/// on stdin/stdout, or on the first of N connections accepted at
/// 127.0.0.1 (port printed), the others only held.
pub fn stream_peer(args: &[String]) -> Result<()> {
    match args.get(1).map(String::as_str) {
        Some("pipe") => {
            let (mut r, mut w) = (sys::inherited(0)?, sys::inherited(1)?);
            serve(&mut *r, &mut *w)
        }
        // A seqpacket socket on fd 3 (one end of the worker's socketpair).
        Some("seqpacket") => {
            let mut s = sys::inherited(3)?;
            let mut w = s.try_clone()?;
            serve(&mut *s, &mut w)
        }
        Some("tcp") => {
            let n: usize = args.get(2).context("stream-peer tcp N")?.parse()?;
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            std::io::stdout().flush()?;
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(l.accept()?.0);
            }
            drop(l);
            // The bench migrates this process next: a connection still in
            // the accept queue refuses the move ("try again").
            println!("accepted");
            std::io::stdout().flush()?;
            let mut c = conns.remove(0);
            c.set_nodelay(true)?;
            let mut w = c.try_clone()?;
            serve(&mut c, &mut w)
        }
        other => bail!("stream-peer: unknown mode {other:?}"),
    }
}

fn serve(r: &mut impl Read, w: &mut impl Write) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    // The worker's CPU, taken again at each measurement: a process that
    // moved comes back with the new node's default affinity.
    let pin: Option<usize> = std::env::var(PIN_ENV).ok().and_then(|c| c.parse().ok());
    loop {
        let mut h = [0u8; 8];
        if r.read_exact(&mut h).is_err() {
            return Ok(());
        }
        if let Some(c) = pin {
            pin_to(c)?;
        }
        let mut left = u64::from_le_bytes(h) as usize;
        while left > 0 {
            let k = r.read(&mut buf[..left.min(CHUNK)])?;
            if k == 0 {
                bail!("stream-peer: end of stream with {left} bytes to come");
            }
            left -= k;
        }
        w.write_all(b"k")?;
    }
}

/// MB/s for `mib` MiB, then round trip p50 and p99 (µs) over `pings`.
fn measure(w: &mut impl Write, r: &mut impl Read, mib: usize, pings: usize) -> Result<[f64; 3]> {
    measure_in(w, r, mib, pings, CHUNK)
}

/// [`measure`] in writes of `chunk` bytes; a seqpacket socket's (below
/// CHUNK) also sends each length as a message of its own.
fn measure_in(
    w: &mut impl Write,
    r: &mut impl Read,
    mib: usize,
    pings: usize,
    chunk: usize,
) -> Result<[f64; 3]> {
    let buf = vec![0x5au8; chunk];
    let mut ack = [0u8; 1];
    let total = mib * CHUNK;
    let t = Instant::now();
    w.write_all(&(total as u64).to_le_bytes())?;
    for _ in 0..total / chunk {
        w.write_all(&buf)?;
    }
    r.read_exact(&mut ack)?;
    let mbs = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    let mut msg = [7u8; 8 + MSG];
    msg[..8].copy_from_slice(&(MSG as u64).to_le_bytes());
    let mut v = Vec::with_capacity(pings);
    for _ in 0..pings {
        let t = Instant::now();
        if chunk < CHUNK {
            w.write_all(&msg[..8])?;
            w.write_all(&msg[8..])?;
        } else {
            w.write_all(&msg)?;
        }
        r.read_exact(&mut ack)?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok([mbs, quantile(&mut v, 0.5), quantile(&mut v, 0.99)])
}

/// Seqpacket messages of the throughput measurement.
const SEQ_CHUNK: usize = 32 << 10;

/// Medians of REPEAT seqpacket measurements on `s`.
fn seq_measured(s: &mut std::fs::File, mib: usize, pings: usize) -> Result<[f64; 3]> {
    let mut r = s.try_clone()?;
    let mut all = Vec::new();
    for _ in 0..REPEAT {
        all.push(measure_in(s, &mut r, mib, pings, SEQ_CHUNK)?);
    }
    Ok(medians(&all))
}

/// A seqpacket peer: the worker's child on this node, on the other end
/// of a socketpair (its fd 3); the worker's end.
fn seq_peer() -> Result<(Child, std::fs::File)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let (mine, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| anyhow::anyhow!("socketpair: {}", std::io::Error::from(e)))?;
    let t = theirs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    // Pinned here: a fork+exec is placed at its exec, and this start
    // must give a socketpair on one node.
    cmd.env(PIN_ENV, this_cpu().to_string())
        .args(["worker", "stream-peer", "seqpacket"])
        .env("KRG_NODE", "1")
        .stdin(Stdio::null());
    // The peer's end at fd 3, without close-on-exec.
    sys::fd_at_exec(&mut cmd, t, 3);
    let p = cmd.spawn().context("starting the seqpacket peer")?;
    drop(theirs);
    Ok((p, std::fs::File::from(mine)))
}

/// Medians of REPEAT measurements.
fn measured(w: &mut impl Write, r: &mut impl Read, mib: usize, pings: usize) -> Result<[f64; 3]> {
    let mut all: Vec<[f64; 3]> = Vec::new();
    for _ in 0..REPEAT {
        all.push(measure(w, r, mib, pings)?);
    }
    Ok(medians(&all))
}

fn medians(all: &[[f64; 3]]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (i, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = all.iter().map(|x| x[i]).collect();
        *o = quantile(&mut v, 0.5);
    }
    out
}

/// Rounds of the interleaved comparison.
const ROUNDS: usize = 9;

/// The moved stream `a` and an untouched one `b`, measured in turns
/// (ROUNDS each, the first of each pair alternating): their medians.
fn side_by_side(
    a: (&mut impl Write, &mut impl Read),
    b: (&mut impl Write, &mut impl Read),
    mib: usize,
    pings: usize,
) -> Result<([f64; 3], [f64; 3])> {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        if i % 2 == 0 {
            va.push(measure(a.0, a.1, mib, pings)?);
            vb.push(measure(b.0, b.1, mib, pings)?);
        } else {
            vb.push(measure(b.0, b.1, mib, pings)?);
            va.push(measure(a.0, a.1, mib, pings)?);
        }
    }
    Ok((medians(&va), medians(&vb)))
}

/// `krg migrate PID NODE` in a process of its own; its milliseconds.
fn migrate(pid: u32, node: u32) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(super::krg()?)
        .args(["migrate", &pid.to_string(), &node.to_string()])
        .env("KRG_DISABLE", "1")
        .stdin(Stdio::null())
        .output()
        .context("running krg migrate")?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "krg migrate {pid} {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

/// A TCP peer on node 2 holding `n` connections from here; the first.
fn tcp_peer(n: usize) -> Result<(Child, Vec<TcpStream>)> {
    let mut p = Command::new(std::env::current_exe()?)
        .env(PIN_ENV, this_cpu().to_string())
        .args(["worker", "stream-peer", "tcp", &n.to_string()])
        .env("KRG_NODE", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the peer on node 2")?;
    // (Its stdout stays open: the peer moves with it.)
    let mut out = BufReader::new(p.stdout.as_mut().context("peer stdout")?);
    let mut port = String::new();
    out.read_line(&mut port)?;
    let to = format!("127.0.0.1:{}", port.trim());
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(&to).with_context(|| format!("connecting to {to}"))?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "accepted" {
        bail!("the tcp peer did not accept its {n} connections: {line:?}");
    }
    drop(out);
    Ok((p, conns))
}

fn end(mut p: Child, what: &str) -> Result<()> {
    let st = p.wait()?;
    if !st.success() {
        bail!("the {what} peer failed: {st}");
    }
    Ok(())
}

/// A pipe peer: the worker's child on this node, on its stdin and stdout.
struct PipePeer {
    p: Child,
    w: std::process::ChildStdin,
    r: std::process::ChildStdout,
}

impl PipePeer {
    fn start() -> Result<PipePeer> {
        let mut p = Command::new(std::env::current_exe()?)
            .env(PIN_ENV, this_cpu().to_string())
            .args(["worker", "stream-peer", "pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the pipe peer")?;
        let w = p.stdin.take().context("peer stdin")?;
        let r = p.stdout.take().context("peer stdout")?;
        Ok(PipePeer { p, w, r })
    }

    fn end(self) -> Result<()> {
        drop((self.w, self.r));
        end(self.p, "pipe")
    }
}

/// `krg-bench worker moved MIB PINGS`. Values: TCP before (3), on one node (3),
/// after (3), an untouched connection alongside (3); pipe before (3),
/// between nodes (3), back on one node (3), an untouched pipe alongside
/// (3); seqpacket on one node (3), relayed between two (3), on one node
/// again (3); migrate ms with 1 and with 100 connections.
pub fn moved_sample(mib: usize, pings: usize) -> Result<Vec<f64>> {
    // The worker and every peer on one CPU (see pin_to): the peers are
    // told the worker's CPU in their environment.
    pin_to(this_cpu())?;
    let mut out = Vec::new();
    // TCP.
    let (p, mut conns) = tcp_peer(1)?;
    let mut s = conns.remove(0);
    let mut r = s.try_clone()?;
    out.extend(measured(&mut s, &mut r, mib, pings)?);
    let one = migrate(p.id(), 1)?;
    out.extend(measured(&mut s, &mut r, mib, pings)?);
    migrate(p.id(), 2)?;
    let (fresh, mut fc) = tcp_peer(1)?;
    let mut f = fc.remove(0);
    let mut fr = f.try_clone()?;
    let (moved, untouched) = side_by_side((&mut s, &mut r), (&mut f, &mut fr), mib, pings)?;
    out.extend(moved);
    out.extend(untouched);
    drop((s, r, f, fr));
    end(p, "TCP")?;
    end(fresh, "untouched TCP")?;
    // Pipe.
    let mut pp = PipePeer::start()?;
    out.extend(measured(&mut pp.w, &mut pp.r, mib, pings)?);
    migrate(pp.p.id(), 2)?;
    out.extend(measured(&mut pp.w, &mut pp.r, mib, pings)?);
    migrate(pp.p.id(), 1)?;
    let mut fresh = PipePeer::start()?;
    let (moved, untouched) = side_by_side(
        (&mut pp.w, &mut pp.r),
        (&mut fresh.w, &mut fresh.r),
        mib,
        pings,
    )?;
    out.extend(moved);
    out.extend(untouched);
    pp.end()?;
    fresh.end()?;
    // Seqpacket: one socketpair, relayed between two nodes, one again.
    let (p, mut sq) = seq_peer()?;
    out.extend(seq_measured(&mut sq, mib, pings)?);
    migrate(p.id(), 2)?;
    out.extend(seq_measured(&mut sq, mib, pings)?);
    migrate(p.id(), 1)?;
    out.extend(seq_measured(&mut sq, mib, pings)?);
    drop(sq);
    end(p, "seqpacket")?;
    // 100 connections.
    let (p, mut conns) = tcp_peer(100)?;
    let many = migrate(p.id(), 1)?;
    // The first one still answers.
    let mut s = conns.remove(0);
    let mut back = s.try_clone()?;
    measure(&mut s, &mut back, 1, 10)?;
    drop((s, back, conns));
    end(p, "100-connection")?;
    out.push(one);
    out.push(many);
    Ok(out)
}

/// Print the section.
pub fn report(v: &[f64], mib: usize, pings: usize) {
    let row = |name: &str, x: &[f64], base: Option<&[f64]>, goal: &str| {
        let rel = base
            .map(|b| {
                format!(
                    "   {:.2}x throughput, {:.2}x latency{goal}",
                    x[0] / b[0],
                    x[1] / b[1]
                )
            })
            .unwrap_or_default();
        println!(
            "  {name:<34} {:7.0} MB/s   round trip {:6.1} us (p99 {:6.1}){rel}",
            x[0], x[1], x[2]
        );
    };
    let ratio = |name: &str, x: &[f64], base: &[f64], goal: &str| {
        println!(
            "  {name:<34} {:.2}x throughput, {:.2}x latency{goal}",
            x[0] / base[0],
            x[1] / base[1]
        );
    };
    println!(
        "streams that moved ({mib} MiB one way; {pings} round trips of {MSG} B; medians of {REPEAT},"
    );
    println!("  after the moves {ROUNDS} rounds each, moved and untouched streams in turns)");
    let (tb, t1, ta, tu) = (&v[0..3], &v[3..6], &v[6..9], &v[9..12]);
    row("TCP node 1 <-> 2, before", tb, None, "");
    row("  peer moved to node 1 (one node)", t1, Some(tb), "");
    row(
        "  peer moved back to node 2",
        ta,
        Some(tb),
        " against before",
    );
    row("  an untouched connection alongside", tu, None, "");
    ratio(
        "  moved back / untouched",
        ta,
        tu,
        " [goal >= 0.97, <= 1.05]",
    );
    let (pb, p2, p1, pu) = (&v[12..15], &v[15..18], &v[18..21], &v[21..24]);
    row("pipe on node 1, before", pb, None, "");
    row("  reader moved to node 2", p2, Some(tu), " against TCP");
    row(
        "  reader moved back to node 1",
        p1,
        Some(pb),
        " against before",
    );
    row("  an untouched pipe alongside", pu, None, "");
    ratio(
        "  moved back / untouched",
        p1,
        pu,
        " [same-node goal >= 0.98 throughput]",
    );
    let (sb, s2, s1) = (&v[24..27], &v[27..30], &v[30..33]);
    row("seqpacket socketpair on node 1", sb, None, "");
    row(
        "  peer moved to node 2 (relayed)",
        s2,
        Some(sb),
        " against the socketpair",
    );
    row("  peer moved back (a socketpair)", s1, Some(sb), "");
    println!(
        "  krg migrate of a process holding 1 connection {:6.1} ms, 100 connections {:6.1} ms",
        v[33], v[34]
    );
}
