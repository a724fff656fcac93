//! The mount table of this process's namespace, from `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`: mountpoint, device, filesystem type, super options.
pub(crate) struct MountInfo {
    pub mountpoint: PathBuf,
    /// `major:minor`, as the kernel names the mount's backing device info in `/sys/class/bdi`.
    pub device: String,
    pub fstype: String,
    pub options: String,
}

fn mounts() -> Vec<MountInfo> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let device = fields.get(2)?.to_string();
            let mountpoint = unescape(fields.get(4)?);
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let options = r.nth(1).unwrap_or("").to_string();
            Some(MountInfo { mountpoint: PathBuf::from(mountpoint), device, fstype, options })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The newest mount on `path`. Canonicalizing stats the path: never call this for a FUSE
/// mount whose daemon is this process and not yet answering (it would wait on itself).
pub(crate) fn mount_at(path: &Path) -> Option<MountInfo> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mount_at_canonical(&path)
}

/// [`mount_at`] for a path already canonical; touches nothing but `/proc/self/mountinfo`.
pub(crate) fn mount_at_canonical(path: &Path) -> Option<MountInfo> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}
