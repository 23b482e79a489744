//! Small wrappers over the socket system calls std does not offer (IPV6_V6ONLY before bind,
//! SO_RCVTIMEO on a listener, AF_PACKET).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `socket(2)`, close-on-exec.
pub fn socket(
    family: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: plain system call.
    let raw = check(unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `bind(2)` with a `sockaddr_*` structure.
pub fn bind<T>(fd: &OwnedFd, addr: &T) -> io::Result<()> {
    let len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `addr` points to a live, fully initialised sockaddr of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), (addr as *const T).cast(), len) }).map(drop)
}

/// `setsockopt(2)` with a value of any plain type.
pub fn set_option<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` points to a live `T` of `len` bytes; the kernel only reads it.
    check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), len) })
        .map(drop)
}

/// SO_RCVTIMEO: blocking receives (and accepts) return a timeout error after `timeout`.
pub fn set_receive_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_option(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
}

/// Turns a negative system call return into the `errno` error.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Whether a socket error is just a receive timeout expiring.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
