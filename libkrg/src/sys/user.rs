//! Views of the pointers an application hands to a hook. Making one is
//! `unsafe` (the maker vouches for the pointer, by the contract of the C
//! call the hook stands for: that happens in the `abi` fences); using one
//! is safe. No view makes a Rust reference to the application's memory
//! except the slices, whose makers say so: reads and writes are unaligned
//! copies, as C structures may be anywhere.

use libc::c_char;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A `T` the application gave to be read (perhaps unaligned).
#[derive(Clone, Copy, Debug)]
pub struct Ptr<'a, T> {
    p: NonNull<T>,
    _life: PhantomData<&'a T>,
}

impl<'a, T: Copy> Ptr<'a, T> {
    /// `None` for null.
    ///
    /// # Safety
    /// `p` is null or valid for reads of a `T` during `'a`.
    #[inline]
    pub unsafe fn new(p: *const T) -> Option<Ptr<'a, T>> {
        Some(Ptr {
            p: NonNull::new(p.cast_mut())?,
            _life: PhantomData,
        })
    }

    /// A copy of the `T`.
    #[inline]
    pub fn read(&self) -> T {
        // SAFETY: valid for reads (the maker's contract).
        unsafe { self.p.as_ptr().read_unaligned() }
    }
}

/// A `T` the application gave to be read and written (perhaps
/// unaligned): an argument the call fills or changes.
#[derive(Debug)]
pub struct PtrMut<'a, T> {
    p: NonNull<T>,
    _life: PhantomData<&'a mut T>,
}

impl<'a, T: Copy> PtrMut<'a, T> {
    /// `None` for null.
    ///
    /// # Safety
    /// `p` is null or valid for reads and writes of a `T` during `'a`.
    #[inline]
    pub unsafe fn new(p: *mut T) -> Option<PtrMut<'a, T>> {
        Some(PtrMut {
            p: NonNull::new(p)?,
            _life: PhantomData,
        })
    }

    /// A copy of the `T`.
    #[inline]
    pub fn read(&self) -> T {
        // SAFETY: valid for reads (the maker's contract).
        unsafe { self.p.as_ptr().read_unaligned() }
    }

    /// Store `v` in the `T`.
    #[inline]
    pub fn write(&self, v: T) {
        // SAFETY: valid for writes (the maker's contract).
        unsafe { self.p.as_ptr().write_unaligned(v) }
    }
}

/// A NUL-terminated string the application gave. Read lazily, byte by
/// byte: a hook that only looks at the first bytes never measures it.
#[derive(Clone, Copy, Debug)]
pub struct CStrPtr<'a> {
    p: NonNull<c_char>,
    _life: PhantomData<&'a CStr>,
}

impl<'a> CStrPtr<'a> {
    /// `None` for null.
    ///
    /// # Safety
    /// `p` is null or points to a NUL-terminated string that stays valid
    /// and unchanged during `'a`.
    #[inline]
    pub unsafe fn new(p: *const c_char) -> Option<CStrPtr<'a>> {
        Some(CStrPtr {
            p: NonNull::new(p.cast_mut())?,
            _life: PhantomData,
        })
    }

    /// Its bytes, the NUL excluded.
    #[inline]
    pub fn bytes(self) -> CBytes<'a> {
        CBytes { s: self, i: 0 }
    }

    /// The whole string (measured).
    pub fn to_cstr(self) -> &'a CStr {
        // SAFETY: NUL-terminated, valid and unchanged during 'a (the
        // maker's contract).
        unsafe { CStr::from_ptr(self.p.as_ptr()) }
    }

    pub fn as_ptr(self) -> *const c_char {
        self.p.as_ptr()
    }
}

impl<'a> From<&'a CStr> for CStrPtr<'a> {
    fn from(s: &'a CStr) -> CStrPtr<'a> {
        // SAFETY: a CStr is NUL-terminated and borrowed for 'a.
        unsafe { CStrPtr::new(s.as_ptr()) }.expect("a CStr is not null")
    }
}

/// The bytes of a [`CStrPtr`], up to its NUL.
#[derive(Clone, Debug)]
pub struct CBytes<'a> {
    s: CStrPtr<'a>,
    /// The next byte; `usize::MAX` once the NUL was read.
    i: usize,
}

impl Iterator for CBytes<'_> {
    type Item = u8;

    #[inline]
    fn next(&mut self) -> Option<u8> {
        if self.i == usize::MAX {
            return None;
        }
        // SAFETY: the bytes before i were not the NUL, so byte i is still
        // within the string (the maker's contract).
        let c = unsafe { *self.s.p.as_ptr().add(self.i) } as u8;
        if c == 0 {
            self.i = usize::MAX;
            return None;
        }
        self.i += 1;
        Some(c)
    }
}

/// A null-terminated array of C strings the application gave (`argv`,
/// `envp`).
#[derive(Clone, Copy, Debug)]
pub struct CStrArray<'a> {
    p: Option<NonNull<*const c_char>>,
    _life: PhantomData<&'a CStr>,
}

impl<'a> CStrArray<'a> {
    /// A null `p` is an empty array.
    ///
    /// # Safety
    /// `p` is null or points to a null-terminated array of pointers to
    /// NUL-terminated strings, all valid and unchanged during `'a`.
    pub unsafe fn new(p: *const *const c_char) -> CStrArray<'a> {
        CStrArray {
            p: NonNull::new(p.cast_mut()),
            _life: PhantomData,
        }
    }

    /// The strings, in order.
    pub fn iter(self) -> impl Iterator<Item = &'a CStr> {
        let mut i = 0;
        std::iter::from_fn(move || {
            // SAFETY: the entries before i were not the null terminator, so
            // entry i is within the array (the maker's contract).
            let e = unsafe { *self.p?.as_ptr().add(i) };
            // SAFETY: a non-null entry is a valid C string (the contract).
            let s = unsafe { CStrPtr::new(e) }?;
            i += 1;
            Some(s.to_cstr())
        })
    }
}

/// A message the application gave to send (`struct msghdr`).
#[derive(Clone, Copy, Debug)]
pub struct Msg<'a> {
    p: Ptr<'a, libc::msghdr>,
}

impl<'a> Msg<'a> {
    /// `None` for null.
    ///
    /// # Safety
    /// `p` is null or a valid `msghdr` whose control buffer (if not null)
    /// holds `msg_controllen` readable bytes, during `'a`, which nothing
    /// writes meanwhile (sendmsg(2)'s contract).
    #[inline]
    pub unsafe fn new(p: *const libc::msghdr) -> Option<Msg<'a>> {
        // SAFETY: the function's contract.
        let p = unsafe { Ptr::new(p) }?;
        Some(Msg { p })
    }

    /// A copy of the header.
    #[inline]
    pub fn header(&self) -> libc::msghdr {
        self.p.read()
    }

    /// Its control data (empty without).
    #[inline]
    pub fn control(&self) -> &'a [u8] {
        let h = self.header();
        if h.msg_control.is_null() {
            return &[];
        }
        // SAFETY: the control buffer holds msg_controllen bytes (the
        // maker's contract); u8 needs no alignment.
        unsafe { slice(h.msg_control.cast::<u8>(), h.msg_controllen) }
    }
}

/// A message the application received (`struct msghdr` as `recvmsg`
/// filled it).
#[derive(Debug)]
pub struct MsgMut<'a> {
    p: PtrMut<'a, libc::msghdr>,
}

impl<'a> MsgMut<'a> {
    /// `None` for null.
    ///
    /// # Safety
    /// `p` is null or a valid `msghdr` whose control buffer (if not null)
    /// holds `msg_controllen` readable and writable bytes, during `'a`,
    /// which nothing else touches meanwhile (recvmsg(2)'s contract, once
    /// it returned).
    #[inline]
    pub unsafe fn new(p: *mut libc::msghdr) -> Option<MsgMut<'a>> {
        // SAFETY: the function's contract.
        let p = unsafe { PtrMut::new(p) }?;
        Some(MsgMut { p })
    }

    /// Its control data (empty without).
    pub fn control_mut(&mut self) -> &mut [u8] {
        let h = self.p.read();
        if h.msg_control.is_null() {
            return &mut [];
        }
        // SAFETY: the control buffer holds msg_controllen bytes, writable
        // (the maker's contract), borrowed through `self` only.
        unsafe { slice_mut(h.msg_control.cast::<u8>(), h.msg_controllen) }
    }
}

/// The messages the application gave to `sendmmsg`.
#[derive(Debug)]
pub struct Msgs<'a> {
    p: NonNull<libc::mmsghdr>,
    n: usize,
    _life: PhantomData<&'a mut libc::mmsghdr>,
}

impl<'a> Msgs<'a> {
    /// `None` for null.
    ///
    /// # Safety
    /// `p` is null or valid for `n` `mmsghdr`s during `'a`, each with a
    /// message as [`Msg::new`] wants, and `msg_len` writable
    /// (sendmmsg(2)'s contract).
    pub unsafe fn new(p: *mut libc::mmsghdr, n: usize) -> Option<Msgs<'a>> {
        Some(Msgs {
            p: NonNull::new(p)?,
            n,
            _life: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    /// Message `i`, if `i < len`.
    pub fn get(&self, i: usize) -> Option<Msg<'a>> {
        if i >= self.n {
            return None;
        }
        // SAFETY: entry i < n is valid (the maker's contract), and so is
        // its message.
        unsafe { Msg::new(std::ptr::addr_of!((*self.p.as_ptr().add(i)).msg_hdr)) }
    }

    /// Store what message `i` sent, if `i < len`.
    pub fn set_sent(&self, i: usize, len: u32) {
        if i < self.n {
            // SAFETY: entry i < n is valid and its msg_len writable (the
            // maker's contract).
            unsafe {
                std::ptr::addr_of_mut!((*self.p.as_ptr().add(i)).msg_len).write_unaligned(len)
            }
        }
    }
}

/// A socket address buffer the application gave to be filled: the
/// `addr` and `addrlen` of `accept`, `getsockname`, `getpeername`.
#[derive(Debug)]
pub struct AddrOut<'a> {
    addr: NonNull<u8>,
    len: PtrMut<'a, libc::socklen_t>,
}

impl<'a> AddrOut<'a> {
    /// `None` when either is null.
    ///
    /// # Safety
    /// `len` is null or valid for reads and writes of a `socklen_t`, and
    /// `addr` null or valid for writes of `*len` bytes, during `'a` (the
    /// contract of those calls).
    pub unsafe fn new(addr: *mut libc::sockaddr, len: *mut libc::socklen_t) -> Option<AddrOut<'a>> {
        Some(AddrOut {
            addr: NonNull::new(addr.cast::<u8>())?,
            // SAFETY: the function's contract.
            len: unsafe { PtrMut::new(len) }?,
        })
    }

    /// The room in the buffer (`*addrlen`).
    pub fn room(&self) -> usize {
        self.len.read() as usize
    }

    /// Set `*addrlen`.
    pub fn set_len(&self, len: libc::socklen_t) {
        self.len.write(len)
    }

    /// Give address `a` as the kernel does: at most its room's worth of
    /// it, and its whole length in `*addrlen`.
    pub fn give(&self, a: &[u8]) {
        let n = self.room().min(a.len());
        // SAFETY: `addr` has room for `*addrlen` bytes (the maker's
        // contract); at most that many are written, from our own slice.
        unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), self.addr.as_ptr(), n) };
        self.set_len(a.len() as libc::socklen_t);
    }
}

/// `n` `T`s the application gave, as a slice.
///
/// # Safety
/// `p` is valid and aligned for reads of `n` `T`s during `'a`, which
/// nothing writes meanwhile.
pub unsafe fn slice<'a, T>(p: *const T, n: usize) -> &'a [T] {
    // SAFETY: the function's contract.
    unsafe { std::slice::from_raw_parts(p, n) }
}

/// `n` `T`s the application gave to be written, as a slice.
///
/// # Safety
/// `p` is valid and aligned for reads and writes of `n` `T`s during `'a`,
/// which nothing else touches meanwhile.
pub unsafe fn slice_mut<'a, T>(p: *mut T, n: usize) -> &'a mut [T] {
    // SAFETY: the function's contract.
    unsafe { std::slice::from_raw_parts_mut(p, n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_given_as_the_kernel_gives_it() {
        let mut buf = [0u8; 4];
        let mut len: libc::socklen_t = 4;
        // SAFETY: our buffer, with room for `len` bytes.
        let out = unsafe { AddrOut::new(buf.as_mut_ptr().cast(), &mut len) }.unwrap();
        out.give(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(out.room(), 6, "the whole length");
        assert_eq!(buf, [1, 2, 3, 4], "cut to the room there was");
        // SAFETY: null pointers.
        assert!(unsafe { AddrOut::new(std::ptr::null_mut(), &mut len) }.is_none());
    }
}
