//! Thin, safe wrappers over the `*at` system calls restore needs: every path is one name
//! relative to a directory descriptor, so nothing is resolved through a symlink we did not
//! create.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: valid C string; the returned descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) };
    check(fd)?;
    // SAFETY: fd was just opened by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory below `dir`, refusing to follow a symlink in its place.
pub fn open_subdir(dir: &impl AsRawFd, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as in open_dir.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    check(fd)?;
    // SAFETY: fd was just opened by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Create a new file (never an existing one, never through a symlink).
pub fn create_file(dir: &impl AsRawFd, name: &[u8]) -> io::Result<std::fs::File> {
    let c = cstr(name)?;
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as in open_dir.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, 0o600 as libc::c_uint) };
    check(fd)?;
    // SAFETY: fd was just opened by us.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

pub fn mkdir(dir: &impl AsRawFd, name: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700) })
}

pub fn symlink(target: &[u8], dir: &impl AsRawFd, name: &[u8]) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: valid descriptor and C strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })
}

pub fn link(old_dir: RawFd, old_name: &[u8], dir: &impl AsRawFd, name: &[u8]) -> io::Result<()> {
    let (o, c) = (cstr(old_name)?, cstr(name)?);
    // SAFETY: valid descriptors and C strings; flags 0 = do not follow a symlink at old.
    check(unsafe { libc::linkat(old_dir, o.as_ptr(), dir.as_raw_fd(), c.as_ptr(), 0) })
}

pub fn mknod(dir: &impl AsRawFd, name: &[u8], mode: libc::mode_t, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode, rdev as libc::dev_t) })
}

pub fn rename(dir: &impl AsRawFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid descriptor and C strings.
    check(unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) })
}

pub fn unlink(dir: &impl AsRawFd, name: &[u8], is_dir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })
}

/// lstat of a name below `dir`; `None` if it does not exist.
pub fn lstat(dir: &impl AsRawFd, name: &[u8]) -> io::Result<Option<libc::stat>> {
    let c = cstr(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is written by fstatat on success.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) };
    }
    // SAFETY: fstatat succeeded.
    Ok(Some(unsafe { st.assume_init() }))
}

/// Owner, then mode (chown clears setuid bits), then times — of a name, not following it.
pub fn chown(dir: &impl AsRawFd, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
}

pub fn set_mtime(dir: &impl AsRawFd, name: &[u8], mtime_ns: i64) -> io::Result<()> {
    let c = cstr(name)?;
    let t = libc::timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    let times = [t, t];
    // SAFETY: valid descriptor, C string and two timespecs.
    check(unsafe { libc::utimensat(dir.as_raw_fd(), c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// Set an extended attribute on a name below `dir` without following a symlink.
pub fn set_xattr(dir: &impl AsRawFd, name: &[u8], attr: &[u8], value: &[u8]) -> io::Result<()> {
    let path = format!("/proc/self/fd/{}/", dir.as_raw_fd());
    let mut full = path.into_bytes();
    full.extend_from_slice(name);
    let (p, a) = (cstr(&full)?, cstr(attr)?);
    // SAFETY: valid C strings and a buffer of value.len() bytes.
    check(unsafe { libc::lsetxattr(p.as_ptr(), a.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// Open a name below `dir` for its metadata only, refusing to follow a symlink in its
/// place: `O_PATH`, as opening a device or FIFO for reading can block or have effects.
pub fn open_path(dir: &impl AsRawFd, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as in open_dir.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    check(fd)?;
    // SAFETY: fd was just opened by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is written by fstat on success; fstat accepts O_PATH descriptors.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded.
    Ok(unsafe { st.assume_init() })
}

// The f* functions below act on an open object, never on a name. An O_PATH descriptor is
// refused (EBADF) by fchmod, fsetxattr and futimens; for those, its /proc/self/fd link
// reaches the same inode without resolving any name again.

fn proc_link(fd: &impl AsRawFd) -> io::Result<CString> {
    if !std::path::Path::new("/proc/self/fd").is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the metadata of a device node, FIFO or socket is set through /proc, which is not mounted",
        ));
    }
    cstr(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())
}

fn or_via_proc(
    r: io::Result<()>,
    fd: &impl AsRawFd,
    f: impl FnOnce(&CString) -> io::Result<()>,
) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => f(&proc_link(fd)?),
        r => r,
    }
}

pub fn fchown(fd: &impl AsRawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and an empty C string; AT_EMPTY_PATH accepts O_PATH too.
    check(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) })
}

pub fn fchmod(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    let mode = mode as libc::mode_t;
    // SAFETY: valid descriptor.
    let r = check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) });
    // SAFETY: valid C string.
    or_via_proc(r, fd, |p| check(unsafe { libc::chmod(p.as_ptr(), mode) }))
}

fn times(mtime_ns: i64) -> [libc::timespec; 2] {
    let t = libc::timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    [t, t]
}

pub fn fset_mtime(fd: &impl AsRawFd, mtime_ns: i64) -> io::Result<()> {
    let times = times(mtime_ns);
    // SAFETY: valid descriptor and two timespecs.
    let r = check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) });
    // SAFETY: valid C string and two timespecs.
    or_via_proc(r, fd, |p| check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }))
}

/// Remove an extended attribute; one that is not there (or a filesystem without any) is
/// not an error.
pub fn fremove_xattr(fd: &impl AsRawFd, attr: &[u8]) -> io::Result<()> {
    let a = cstr(attr)?;
    // SAFETY: valid descriptor and C string.
    let r = check(unsafe { libc::fremovexattr(fd.as_raw_fd(), a.as_ptr()) });
    // SAFETY: valid C strings.
    match or_via_proc(r, fd, |p| check(unsafe { libc::removexattr(p.as_ptr(), a.as_ptr()) })) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::EOPNOTSUPP)) => Ok(()),
        // No /proc: an inherited ACL stays on a special file rather than failing it.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        r => r,
    }
}

pub fn fset_xattr(fd: &impl AsRawFd, attr: &[u8], value: &[u8]) -> io::Result<()> {
    let a = cstr(attr)?;
    let (v, n) = (value.as_ptr().cast(), value.len());
    // SAFETY: valid descriptor, C string and a buffer of value.len() bytes.
    let r = check(unsafe { libc::fsetxattr(fd.as_raw_fd(), a.as_ptr(), v, n, 0) });
    // SAFETY: valid C strings and the same buffer.
    or_via_proc(r, fd, |p| check(unsafe { libc::setxattr(p.as_ptr(), a.as_ptr(), v, n, 0) }))
}
