//! Length-prefixed, validated rkyv frames.
//!
//! A frame is `len: u32 LE` then `len` bytes of rkyv archive. Decoding always
//! validates the archive; a frame longer than the caller's limit is refused
//! before anything is read into memory.

#![deny(unsafe_code)]

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use std::io::{self, Read, Write};

/// Largest request frame the agent accepts.
/// Large enough for the bytes a moving TCP connection had in flight
/// (`StreamDrained`, `StreamAttach`: socket buffers, a few MiB).
pub const MAX_REQUEST: usize = 64 * 1024 * 1024;
/// Largest response frame a client accepts (a `ps` of a big cluster).
pub const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// Serialise `value` into a complete frame (length prefix included).
pub fn encode<T>(value: &T) -> io::Result<Vec<u8>>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    // A local arena, not rkyv's thread-local one: a checkpoint handler
    // encodes from a temporary allocation arena, and a thread-local kept
    // across it would point into memory that is gone afterwards.
    let mut arena = rkyv::ser::allocator::Arena::new();
    let body = rkyv::api::high::to_bytes_with_alloc::<_, rancor::Error>(value, arena.acquire())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("encode: {e}")))?;
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Validate and deserialise a frame body (without its length prefix).
pub fn decode<T>(body: &[u8]) -> io::Result<T>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    // rkyv needs the archive aligned; a socket buffer gives no such promise.
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<T, rancor::Error>(&aligned)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("invalid frame: {e}")))
}

/// Check a length prefix against a limit.
pub fn check_len(len_bytes: [u8; 4], max: usize) -> io::Result<usize> {
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty frame"));
    }
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    Ok(len)
}

/// Write one frame.
pub fn write_frame<T, W: Write>(w: &mut W, value: &T) -> io::Result<()>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    w.write_all(&encode(value)?)
}

/// Read and validate one frame of at most `max` bytes.
pub fn read_frame<T, R: Read>(r: &mut R, max: usize) -> io::Result<T>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = check_len(len, max)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ProcInfo, Request, Response};

    #[test]
    fn round_trip() {
        let req = Request::CapSet {
            gpid: 1 << 22 | 7,
            spec: "-dfs".into(),
            effective: true,
            inheritable: false,
        };
        let bytes = encode(&req).unwrap();
        let back: Request = read_frame(&mut &bytes[..], MAX_REQUEST).unwrap();
        assert_eq!(back, req);
        let resp = Response::Ps(vec![ProcInfo {
            pid: 1 << 22 | 9,
            node: 1,
            ppid: 1,
            pgid: 1,
            uid: 0,
            user: "root".into(),
            state: "S".into(),
            cpu: 0.5,
            rss_kb: 1000,
            cpu_time_ms: 20,
            elapsed_s: 1.5,
            command: "sleep 10".into(),
            caps: 3,
        }]);
        let bytes = encode(&resp).unwrap();
        let back: Response = read_frame(&mut &bytes[..], MAX_RESPONSE).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn garbage_is_rejected_not_trusted() {
        // Every truncation of a valid frame and a pile of noise must fail
        // cleanly, never panic or yield a value.
        let bytes = encode(&Request::Kill { pid: -5, sig: 9 }).unwrap();
        for cut in 0..bytes.len() {
            assert!(read_frame::<Request, _>(&mut &bytes[..cut], MAX_REQUEST).is_err());
        }
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let n = (seed % 64) as usize + 1;
            let mut noise = (n as u32).to_le_bytes().to_vec();
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                noise.push(seed as u8);
            }
            let _ = read_frame::<Request, _>(&mut &noise[..], MAX_REQUEST);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let huge = (MAX_REQUEST as u32 + 1).to_le_bytes();
        let e = read_frame::<Request, _>(&mut &huge[..], MAX_REQUEST).unwrap_err();
        assert!(e.to_string().contains("exceeds"));
    }
}
