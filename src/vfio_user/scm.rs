//! `recvmsg` / `sendmsg` with file descriptors (`SCM_RIGHTS`) on a UNIX stream socket.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message may carry (the `max_msg_fds` we advertise).
pub const MAX_FDS: usize = 16;

/// Room for [`MAX_FDS`] descriptors plus slack, so a peer sending a few too many is detected
/// (`MSG_CTRUNC`) rather than silently cut.
const CMSG_BUF_LEN: usize = 256;

/// What one `recvmsg` returned.
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes read (0 at end of stream).
    pub len: usize,
    /// Descriptors received (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors that did not fit: the message is unusable.
    pub truncated: bool,
}

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

/// Receives into `buf` with `MSG_CMSG_CLOEXEC`, collecting any descriptors. Blocks or not as the
/// socket does.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = CmsgBuf([0; CMSG_BUF_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF_LEN;
    // SAFETY: `msg` points at `iov` (describing `buf`, valid for writes of `buf.len()` bytes)
    // and at `cmsg` (valid for CMSG_BUF_LEN bytes); both outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Received {
        len: n as usize,
        fds: Vec::new(),
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    };
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR reads only msg_control/msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points inside `cmsg` as returned by CMSG_FIRSTHDR or
        // CMSG_NXTHDR, which bound it by msg_controllen.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation on a constant.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(head) / size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS message holds `count` ints within cmsg_len.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, so the read stays within this control message; the data
                // may be unaligned, hence read_unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                if raw >= 0 {
                    // SAFETY: the kernel just installed `raw` in our table for us; we own it.
                    out.fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: `msg` and `c` are valid as above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(out)
}

/// Sends `buf` with at most [`MAX_FDS`] descriptors attached (none: a plain send). Blocks or
/// not as the socket does. Returns the bytes sent; descriptors go with the first byte, so a
/// caller resending a tail must not resend them.
pub fn send_with_fds(fd: RawFd, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    send_fds_unlimited(fd, buf, fds)
}

/// [`send_with_fds`] without our limit (the kernel's SCM_MAX_FD still applies): for tests that
/// send a peer more descriptors than it allows.
#[doc(hidden)]
pub fn send_fds_unlimited(fd: RawFd, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in recv_with_fds: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: pure computations on a length.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(data_len as u32),
            libc::CMSG_LEN(data_len as u32),
        )
    };
    // u64 elements keep the control buffer aligned for cmsghdr. Allocated only when descriptors
    // go along: a plain reply (the register-access path) allocates nothing.
    let mut cmsg = if fds.is_empty() {
        Vec::new()
    } else {
        vec![0u64; (space as usize).div_ceil(8)]
    };
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as usize;
        // SAFETY: msg_control points at `cmsg`, which has room for `space` bytes.
        let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: `c` is the first header inside `cmsg` (non-null: controllen holds one header);
        // its data area has room for `data_len` bytes by the CMSG_SPACE computation.
        unsafe {
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = len as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
        }
    }
    // SAFETY: `msg` describes `buf` (valid for reads) and `cmsg`, both alive for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let f = crate::sys::memfd::memfd("x", 4096).unwrap();
        assert_eq!(
            send_with_fds(a.as_raw_fd(), b"hello", &[f.as_raw_fd(), f.as_raw_fd()]).unwrap(),
            5
        );
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(
            (&buf[..r.len], r.fds.len(), r.truncated),
            (&b"hello"[..], 2, false)
        );
        let again = File::from(r.fds.into_iter().next().unwrap());
        assert_eq!(again.metadata().unwrap().len(), 4096);
        // Nothing pending: would block.
        assert_eq!(
            recv_with_fds(b.as_raw_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn too_many_fds_are_detected() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = crate::sys::memfd::memfd("x", 1).unwrap();
        let many = vec![f.as_raw_fd(); 100];
        assert_eq!(
            send_with_fds(a.as_raw_fd(), b"x", &many)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::E2BIG)
        );
        assert_eq!(send_fds_unlimited(a.as_raw_fd(), b"x", &many).unwrap(), 1);
        let mut buf = [0u8; 4];
        let r = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert!(r.truncated);
        assert!(r.fds.len() <= (CMSG_BUF_LEN / 4));
    }

    use std::fs::File;
}
