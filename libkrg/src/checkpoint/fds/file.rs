//! A regular file or directory: reopened by path at its offset with its
//! status flags, refused where the path names another file.

#![deny(unsafe_code)]

use super::{fstat, open_path, FdKind, FdState, Kind, Probe, Restoring, Sharing};
use crate::error::Error;
use crate::sys::fd as sysfd;
use std::os::fd::RawFd;

pub struct File;

impl Kind for File {
    fn describe(&self, p: &Probe) -> Option<Result<FdKind, Error>> {
        if !matches!(p.ty(), libc::S_IFREG | libc::S_IFDIR) {
            return None;
        }
        let offset = sysfd::lseek(p.fd, 0, libc::SEEK_CUR).unwrap_or(-1);
        if !p.link.starts_with(b"/") {
            return Some(Err(Error::refused("has no path to reopen it by")
                .fd(p.fd)
                .path(&p.link_s)));
        }
        Some(Ok(FdKind::File {
            path: p.link.clone(),
            flags: p.flags,
            offset: offset.max(0),
            dev: p.st.st_dev,
            ino: p.st.st_ino,
        }))
    }

    /// The offsets read again. After `refuse_shared` has found no
    /// other holder of their descriptions (a migration), nothing but this
    /// frozen process can move them any more; but before, a holder may have
    /// written (and ended) after the capture read the offset, and the file
    /// opened again there would overwrite that write.
    fn settle(&self, fds: &mut [FdState], why: super::Purpose) -> Result<(), Error> {
        if why != super::Purpose::Migration {
            return Ok(());
        }
        for f in fds.iter_mut() {
            if let FdKind::File { offset, .. } = &mut f.kind {
                if let Ok(now) = sysfd::lseek(f.fd, 0, libc::SEEK_CUR) {
                    *offset = now;
                }
            }
        }
        Ok(())
    }

    fn sharing(&self, f: &FdState, _fds: &[FdState], moving: bool) -> Option<Sharing> {
        match &f.kind {
            FdKind::File { path, .. } if moving && f.fd > 2 => Some(Sharing::File(
                f.fd,
                String::from_utf8_lossy(path).into_owned(),
            )),
            _ => None,
        }
    }

    fn restore(&self, f: &FdState, _cx: &mut Restoring) -> Result<Option<RawFd>, Error> {
        let FdKind::File {
            path,
            flags,
            offset,
            dev,
            ino,
        } = &f.kind
        else {
            unreachable!("File::restore of {:?}", f.kind)
        };
        let fl = flags & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY);
        let opened = open_path(path, fl | libc::O_NOCTTY);
        let same = opened
            .as_ref()
            .ok()
            .and_then(|fd| fstat(*fd))
            .is_some_and(|st| st.st_dev == *dev && st.st_ino == *ino);
        if f.fd <= 2 && !same {
            // Stdio the image had in a file this node does not have: keep
            // what the restarting command gave instead.
            if let Ok(fd) = opened {
                let _ = sysfd::close(fd);
            }
            crate::krg_log!(
                crate::log::Level::Warn,
                "fd {}: {} is not on this node; using the restarting command's",
                f.fd,
                String::from_utf8_lossy(path)
            );
            return Ok(None);
        }
        let fd = opened.map_err(|e| e.fd(f.fd))?;
        let st = fstat(fd).ok_or_else(|| Error::last_os("fstat").fd(f.fd))?;
        if st.st_dev != *dev || st.st_ino != *ino {
            return Err(Error::errno(
                libc::ESTALE,
                "another file on this node than where the image was taken",
            )
            .fd(f.fd)
            .path(String::from_utf8_lossy(path)));
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG
            && sysfd::lseek(fd, *offset, libc::SEEK_SET).is_err()
        {
            return Err(Error::last_os("seek").fd(f.fd));
        }
        Ok(Some(fd))
    }
}
